"""eliminate_dead_code: unused values and the weights only they read go; cache writes stay."""

from __future__ import annotations

import torch

from tests.passes.graphs import aten, xllm
from xllm_compiler.passes.cleanup.eliminate_dead_code import eliminate_dead_code
from xllm_compiler.testing import assert_close, code, count, run, trace


def _buffers(gm):
    return set(dict(gm.named_buffers())) | set(dict(gm.named_parameters()))


def test_removes_unused_values_and_the_weights_only_they_read():
    used, unused = torch.randn(8), torch.randn(8)

    def fn(x):
        _ = (x * unused).exp()
        return x * used

    x = torch.randn(4, 8)
    gm = trace(fn, x, weights={"layer.used": used, "layer.unused": unused})
    expected = run(gm, x)
    assert _buffers(gm) == {"layer.used", "layer.unused"}

    assert eliminate_dead_code(gm)

    assert count(gm, aten.exp.default) == 0 and count(gm, aten.mul.Tensor) == 1
    assert _buffers(gm) == {"layer.used"}
    assert not hasattr(gm.layer, "unused")
    assert_close(run(gm, x), expected, torch.float32)


def test_keeps_a_cache_writing_attention_whose_output_is_unused():
    def fn(q, kv, cache, slots, query_lens, seq_lens, tables):
        xllm.paged_attention.default(q, kv, kv, cache, slots, query_lens, seq_lens, tables, 0.5, 0)
        return q * 2

    inputs = (
        torch.randn(3, 2, 4),
        torch.randn(3, 1, 4),
        torch.zeros(2, 2, 4, 1, 4),
        torch.arange(4, 7),
        torch.tensor([3], dtype=torch.int32),
        torch.tensor([3], dtype=torch.int32),
        torch.tensor([[1]], dtype=torch.int32),
    )
    gm = trace(fn, *inputs)
    before = code(gm)

    assert not eliminate_dead_code(gm)
    assert count(gm, xllm.paged_attention.default) == 1
    assert code(gm) == before

    cache = inputs[2].clone()
    gm(*inputs[:2], cache, *inputs[3:])
    assert cache[0, 1, :3].abs().sum() > 0, "the cache write still happens"


def test_keeps_an_in_place_update_of_an_input():
    def fn(x, state):
        state.add_(x)
        return x * 2

    gm = trace(fn, torch.randn(4, 8), torch.randn(4, 8))
    assert not eliminate_dead_code(gm)
    assert count(gm, aten.add_.Tensor) == 1
