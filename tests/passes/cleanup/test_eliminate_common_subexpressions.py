"""eliminate_common_subexpressions: identical pure calls merge; impure and mutating ones never do."""

from __future__ import annotations

import torch

from tests.passes.graphs import aten, xllm
from xllm_compiler.passes.cleanup.eliminate_common_subexpressions import eliminate_common_subexpressions
from xllm_compiler.testing import assert_close, code, count, run, trace


def test_merges_duplicate_expressions_and_their_chains():
    def fn(x):
        return (x * 2 + 1) - (x * 2 + 1), torch.exp(x) * torch.exp(x)

    x = torch.randn(4, 8)
    gm = trace(fn, x)
    expected = run(gm, x)

    result = eliminate_common_subexpressions(gm)

    assert result.matches == 3
    assert count(gm, aten.mul.Tensor) == 2 and count(gm, aten.add.Tensor) == 1 and count(gm, aten.exp.default) == 1
    assert_close(run(gm, x), expected, torch.float32)


def test_keeps_calls_that_differ_in_a_literal_or_its_type():
    gm = trace(lambda x: (x * 2, x * 3, x * 2.0), torch.randn(4, 8))
    before = code(gm)
    assert eliminate_common_subexpressions(gm).matches == 0
    assert code(gm) == before


def test_merges_duplicate_weight_reads():
    weight = torch.randn(8)
    gm = trace(lambda x: x * weight, torch.randn(4, 8), weights={"w": weight})
    with gm.graph.inserting_after(next(n for n in gm.graph.nodes if n.op == "get_attr")):
        again = gm.graph.get_attr("w")
    mul = next(n for n in gm.graph.nodes if n.target is aten.mul.Tensor)
    mul.args = (mul.args[0], again)

    assert eliminate_common_subexpressions(gm).matches == 1
    assert sum(1 for n in gm.graph.nodes if n.op == "get_attr") == 1


def test_never_merges_random_ops():
    gm = trace(lambda x: (torch.rand_like(x), torch.rand_like(x)), torch.randn(4, 8))
    assert eliminate_common_subexpressions(gm).matches == 0
    assert count(gm, aten.rand_like.default) == 2


def _attention_inputs():
    return (
        torch.randn(3, 2, 4),
        torch.randn(3, 1, 4),
        torch.zeros(2, 2, 4, 1, 4),
        torch.arange(4, 7),
        torch.tensor([3], dtype=torch.int32),
        torch.tensor([3], dtype=torch.int32),
        torch.tensor([[1]], dtype=torch.int32),
    )


def test_never_merges_two_identical_cache_writing_attentions():
    def fn(q, kv, cache, *meta):
        first = xllm.paged_attention.default(q, kv, kv, cache, *meta, 0.5, 0)
        second = xllm.paged_attention.default(q, kv, kv, cache, *meta, 0.5, 0)
        return first + second

    gm = trace(fn, *_attention_inputs())
    assert eliminate_common_subexpressions(gm).matches == 0
    assert count(gm, xllm.paged_attention.default) == 2


def test_never_merges_reads_of_a_value_mutated_in_between():
    def fn(x, cache):
        before = cache * 2
        cache.add_(x)
        return before, cache * 2

    inputs = (torch.randn(4, 8), torch.randn(4, 8))
    gm = trace(fn, *inputs)
    expected = run(gm, *inputs)

    assert eliminate_common_subexpressions(gm).matches == 0
    assert count(gm, aten.mul.Tensor) == 2
    assert_close(run(gm, *inputs), expected, torch.float32)


def test_never_merges_values_that_are_mutated_afterwards():
    def fn(x):
        first, second = x.clone(), x.clone()
        first.add_(1.0)
        return first, second

    x = torch.randn(4, 8)
    gm = trace(fn, x)
    expected = run(gm, x)

    eliminate_common_subexpressions(gm)

    assert_close(run(gm, x), expected, torch.float32)
