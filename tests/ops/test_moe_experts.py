"""``xllm::moe_experts``: the CPU's grouped kernel and the capture-safe composite against a dense reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from xllm_compiler.ops import moe
from xllm_compiler.ops.reference import route_topk

NUM_EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 6, 2, 16, 12


def _inputs(num_tokens: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, HIDDEN, generator=generator).to(dtype)
    logits = torch.randn(num_tokens, NUM_EXPERTS, generator=generator)
    weights, ids = route_topk(logits, TOP_K, renormalise=True)
    gate_up = (0.3 * torch.randn(NUM_EXPERTS, 2 * INTERMEDIATE, HIDDEN, generator=generator)).to(dtype)
    down = (0.3 * torch.randn(NUM_EXPERTS, HIDDEN, INTERMEDIATE, generator=generator)).to(dtype)
    return hidden, weights, ids, gate_up, down


def _dense_reference(hidden, weights, ids, gate_up, down) -> torch.Tensor:
    """Token by token, slot by slot, in float64: what every implementation must approximate."""
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            gate, up = F.linear(hidden[t].double(), gate_up[e].double()).chunk(2)
            out[t] += weights[t, slot].double() * F.linear(F.silu(gate) * up, down[e].double())
    return out


@pytest.mark.parametrize("num_tokens", [1, 7, 40])
@pytest.mark.parametrize(
    "kernel", [moe.moe_experts_kernel, moe.capture_safe_moe_experts], ids=["grouped-cpu", "capture-safe"]
)
def test_experts_match_the_dense_reference(kernel, num_tokens):
    args = _inputs(num_tokens, torch.float32)
    torch.testing.assert_close(kernel(*args).double(), _dense_reference(*args), rtol=1e-5, atol=1e-5)


def test_the_op_the_out_form_and_bfloat16_agree():
    args = _inputs(9, torch.bfloat16)
    ours = torch.ops.xllm.moe_experts(*args)
    out = torch.empty_like(args[0])
    torch.ops.xllm.moe_experts_out(*args, out=out)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, out)
    torch.testing.assert_close(ours.double(), _dense_reference(*args), rtol=2e-2, atol=2e-2)


def test_an_expert_no_token_chose_is_never_run(monkeypatch):
    """The grouped kernel runs each expert once over its own rows: T*k rows in all, not T*E."""
    rows_run = []
    expert = moe._expert
    monkeypatch.setattr(moe, "_expert", lambda rows, *w: rows_run.append(rows.shape[0]) or expert(rows, *w))
    hidden, weights, _, gate_up, down = _inputs(5, torch.float32)
    ids = torch.tensor([[0, 3]] * 5)
    moe.moe_experts_kernel(hidden, weights, ids, gate_up, down)
    assert rows_run == [5, 5]


def test_the_fake_kernel_gives_the_hidden_shape():
    with FakeTensorMode():
        args = _inputs(11, torch.float32)
        out = torch.ops.xllm.moe_experts(*args)
    assert out.shape == (11, HIDDEN) and out.dtype == torch.float32


def test_routing_is_float32_and_renormalises_when_asked():
    logits = torch.randn(4, NUM_EXPERTS, dtype=torch.bfloat16)
    weights, ids = route_topk(logits, TOP_K, renormalise=False)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(ids, torch.softmax(logits.float(), -1).topk(TOP_K).indices)
    renormalised, _ = route_topk(logits, TOP_K, renormalise=True)
    torch.testing.assert_close(renormalised.sum(-1), torch.ones(4))


@pytest.mark.parametrize("renormalise", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_routes_then_runs_the_experts_bit_for_bit(renormalise, dtype):
    hidden, _, _, gate_up, down = _inputs(9, dtype)
    logits = torch.randn(9, NUM_EXPERTS).to(dtype)
    weights, ids = route_topk(logits, TOP_K, renormalise)
    expected = torch.ops.xllm.moe_experts(hidden, weights.to(dtype), ids, gate_up, down)
    fused = torch.ops.xllm.fused_moe(hidden, logits, gate_up, down, TOP_K, renormalise, True)
    assert torch.equal(fused, expected)
    capture_safe = moe.capture_safe_fused_moe(hidden, logits, gate_up, down, TOP_K, renormalise, True)
    torch.testing.assert_close(capture_safe, expected, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
