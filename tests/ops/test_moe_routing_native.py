"""ops/cpu_moe_routing.cpp: the packed experts' host routing (softmax, top-k, renormalisation) and expert
counting against the composites they replace (ops/reference.py's route_topk, ops/moe.py's count_routed)."""

from __future__ import annotations

import pytest
import torch

from xllm_compiler.interface import PAD_SLOT
from xllm_compiler.ops import moe
from xllm_compiler.ops.native import native_kernels
from xllm_compiler.ops.reference import route_topk

native = native_kernels()
pytestmark = pytest.mark.skipif(native is None, reason="no native kernels in this build")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("experts", "top_k"), [(8, 1), (8, 2), (60, 4), (16, 16)])
@pytest.mark.parametrize("renormalise", [False, True])
def test_route_topk_matches_the_reference(dtype, experts, top_k, renormalise):
    logits = (2 * torch.randn(37, experts, generator=torch.Generator().manual_seed(experts + top_k))).to(dtype)
    weights, ids = native.route_topk(logits, top_k, renormalise)
    want_weights, want_ids = route_topk(logits, top_k, renormalise)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(ids, want_ids)  # bfloat16 logits tie: the tied experts come out in torch.topk's order
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-7)


def test_route_topk_reads_a_strided_input_and_refuses_a_bad_top_k():
    logits = torch.randn(5, 16)[:, ::2]
    assert torch.equal(native.route_topk(logits, 2, True)[1], route_topk(logits, 2, True)[1])
    with pytest.raises(RuntimeError, match="top_k"):
        native.route_topk(logits, 9, True)


def test_count_routed_matches_the_composite_and_skips_padding():
    ids = torch.tensor([[0, 3], [3, 1], [2, 2], [5, 0]])
    slots = torch.tensor([17, PAD_SLOT, 4, 9])  # token 1 is padding
    got, want = torch.zeros(7, dtype=torch.int64), torch.zeros(7, dtype=torch.int64)
    for _ in range(2):  # counts accumulate
        native.count_routed(ids, got, slots, PAD_SLOT)
        moe.count_routed(ids, want, slots)
    assert torch.equal(got, want) and got.tolist() == [4, 0, 4, 2, 0, 2, 6]


def test_count_routed_refuses_an_id_out_of_range_and_counts_nothing():
    counts = torch.zeros(5, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="out of range"):
        native.count_routed(torch.tensor([[0, 1], [4, 0]]), counts, torch.tensor([3, 5]), PAD_SLOT)
    assert counts.eq(0).all()
