"""The pattern matcher: operand order, literal parameters, escaping intermediates, several outputs,
mutated inputs, untouched graphs, and a search whose work grows linearly with depth."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F

from tests.passes.graphs import aten, model_graph, xllm
from xllm_compiler.ops import reference
from xllm_compiler.passes import default_pipeline
from xllm_compiler.passes.fusion.fuse_add_rms_norm import fuse_add_rms_norm
from xllm_compiler.passes.fusion.fuse_rms_norm import fuse_rms_norm
from xllm_compiler.passes.fusion.fuse_rotary_embedding import fuse_rotary_embedding
from xllm_compiler.passes.fusion.fuse_silu_and_mul import fuse_silu_and_mul
from xllm_compiler.passes.matcher import PatternGraph
from xllm_compiler.passes.pattern_pass import FusionPass
from xllm_compiler.testing import assert_close, check_meta, cleanup, code, count, run, trace

# -- operand order -------------------------------------------------------------------------------


def _norm(x, weight, eps, swap_inner, swap_outer):
    """reference.rms_norm with the operands of its two products in either order."""
    h = x.to(torch.float32)
    inverse = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = (inverse * h) if swap_inner else (h * inverse)
    h = h.to(x.dtype)
    return (h * weight) if swap_outer else (weight * h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("swap_inner", [False, True])
@pytest.mark.parametrize("swap_outer", [False, True])
def test_products_match_in_either_operand_order(swap_outer, swap_inner, dtype):
    weight = torch.randn(16, dtype=dtype)
    x = torch.randn(5, 16, dtype=dtype)
    gm = cleanup(trace(lambda x: _norm(x, weight, 1e-6, swap_inner, swap_outer), x, weights={"w": weight}))
    expected = run(gm, x)

    assert fuse_rms_norm(gm).matches == 1
    assert_close(run(gm, x), expected, dtype)


@pytest.mark.parametrize("swap", [False, True])
def test_silu_times_up_matches_either_way_round(swap):
    inputs = (torch.randn(5, 8), torch.randn(5, 8))
    gm = cleanup(trace(lambda g, u: (u * F.silu(g)) if swap else (F.silu(g) * u), *inputs))
    expected = run(gm, *inputs)
    assert fuse_silu_and_mul(gm).matches == 1
    assert_close(run(gm, *inputs), expected, torch.float32)


@pytest.mark.parametrize("swap", [False, True])
def test_residual_add_matches_either_way_round(swap):
    weight = torch.randn(16)
    inputs = (torch.randn(5, 16), torch.randn(5, 16))

    def fn(x, residual):
        update = x * 2  # a computed operand, so that the two orders differ in structure
        h = (residual + update) if swap else (update + residual)
        return reference.rms_norm(h, weight, 1e-6), h

    gm = cleanup(trace(fn, *inputs, weights={"w": weight}))
    expected = run(gm, *inputs)
    assert fuse_add_rms_norm(gm).matches == 1
    assert_close(run(gm, *inputs), expected, torch.float32)
    check_meta(gm, *inputs)


def _rotary(x, cos, sin, cos_first):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (cos * x + sin * rotated) if cos_first else (x * cos + rotated * sin)


def _rotary_inputs():
    return torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 1, 8), torch.randn(5, 1, 8)


def test_rotary_in_the_models_operand_order_matches():
    inputs = _rotary_inputs()
    gm = cleanup(trace(lambda q, k, c, s: (_rotary(q, c, s, False), _rotary(k, c, s, False)), *inputs))
    assert fuse_rotary_embedding(gm).matches == 1


def test_rotary_with_cos_times_q_matches():
    inputs = _rotary_inputs()
    gm = cleanup(trace(lambda q, k, c, s: (_rotary(q, c, s, True), _rotary(k, c, s, True)), *inputs))
    expected = run(gm, *inputs)
    assert fuse_rotary_embedding(gm).matches == 1
    assert_close(run(gm, *inputs), expected, torch.float32)


# -- literal parameters --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pattern_binds_every_eps_and_hands_each_to_its_replacement(dtype):
    eps = (1e-5, 1e-6, 3e-7, 1e-6)
    weights = [torch.randn(16, dtype=dtype) for _ in eps]

    def fn(x):
        for w, e in zip(weights, eps, strict=True):
            x = reference.rms_norm(x, w, e) * 1.5
        return x

    x = torch.randn(5, 16, dtype=dtype)
    gm = cleanup(trace(fn, x, weights={f"w{i}": w for i, w in enumerate(weights)}))
    expected = run(gm, x)

    assert fuse_rms_norm(gm).matches == len(eps)
    assert [n.args[2] for n in gm.graph.nodes if n.target is xllm.rms_norm.default] == list(eps)
    assert_close(run(gm, x), expected, dtype)


def _shift_product(received):
    """A made-up fusion whose parameter appears twice: both places must bind one value, which the
    replacement receives (it records it)."""

    def pattern(x, y, shift):
        return (x + shift) * (y + shift)

    def replacement(x, y, shift):
        received.append(shift)
        return aten.mul.Tensor(aten.add.Tensor(x, shift), aten.add.Tensor(y, shift))

    def example_inputs():
        return dict(x=torch.randn(3, 4), y=torch.randn(3, 4), shift=0.5)

    return FusionPass("fuse_shift_product", 1, pattern=pattern, replacement=replacement, example_inputs=example_inputs)


def test_a_parameter_used_twice_binds_one_value():
    received: list[float] = []
    fusion = _shift_product(received)
    inputs = (torch.randn(3, 4), torch.randn(3, 4))
    same = cleanup(trace(lambda x, y: (x + 0.25) * (y + 0.25), *inputs))
    different = cleanup(trace(lambda x, y: (x + 0.25) * (y + 0.75), *inputs))
    expected = run(same, *inputs)

    assert fusion(same).matches == 1
    assert received == [0.25]
    assert_close(run(same, *inputs), expected, torch.float32)
    assert fusion(different).matches == 0
    assert received == [0.25]


def test_a_rules_check_can_veto_a_match():
    from xllm_compiler.passes.fusion.fuse_rms_norm import example_inputs, pattern, replacement

    def small_eps_only(match):
        return match.bindings["eps"] < 1e-5

    fusion = FusionPass("fuse_small_eps_norms", 1, pattern, replacement, example_inputs, check=small_eps_only)
    weights = [torch.randn(16), torch.randn(16)]

    def fn(x):
        return reference.rms_norm(reference.rms_norm(x, weights[0], 1e-6), weights[1], 1e-3)

    x = torch.randn(5, 16)
    gm = cleanup(trace(fn, x, weights={"w0": weights[0], "w1": weights[1]}))
    expected = run(gm, x)
    assert fusion(gm).matches == 1
    assert [n.args[2] for n in gm.graph.nodes if n.target is xllm.rms_norm.default] == [1e-6]
    assert_close(run(gm, x), expected, torch.float32)


# -- what a match may not do ---------------------------------------------------------------------


def test_a_pattern_whose_intermediate_is_used_elsewhere_is_not_fused():
    # In bfloat16 the norm's float32 copy of x is an intermediate; here the graph also returns it.
    weight = torch.randn(16, dtype=torch.bfloat16)
    x = torch.randn(5, 16, dtype=torch.bfloat16)

    def fn(x):
        return reference.rms_norm(x, weight, 1e-6), x.to(torch.float32)

    gm = cleanup(trace(fn, x, weights={"w": weight}))
    before = code(gm)
    assert count(gm, aten.to.dtype) == 2, "the norm's cast and the returned one are one node after CSE"
    assert fuse_rms_norm(gm).matches == 0
    assert code(gm) == before


@pytest.mark.parametrize("mutation", ["add_", "paged_attention"])
def test_refuses_to_bind_an_input_that_an_op_mutates(mutation):
    weight = torch.randn(4)
    meta = (
        torch.arange(4, 7),
        torch.tensor([3], dtype=torch.int32),
        torch.tensor([3], dtype=torch.int32),
        torch.tensor([[1]], dtype=torch.int32),
    )

    def fn(cache, q, kv, *meta):
        normed = reference.rms_norm(cache, weight, 1e-6)
        if mutation == "add_":
            cache.add_(1.0)
            return normed
        return normed, xllm.paged_attention.default(q, kv, kv, cache, *meta, 0.5, 0)

    inputs = (torch.randn(2, 2, 4, 1, 4), torch.randn(3, 2, 4), torch.randn(3, 1, 4), *meta)
    gm = cleanup(trace(fn, *inputs, weights={"w": weight}))
    before = code(gm)
    assert fuse_rms_norm(gm).matches == 0
    assert code(gm) == before

    unmutated = cleanup(trace(lambda cache: reference.rms_norm(cache, weight, 1e-6), inputs[0], weights={"w": weight}))
    assert fuse_rms_norm(unmutated).matches == 1


# -- several outputs -----------------------------------------------------------------------------


def _product_and_sum():
    """A made-up two-output fusion: x * y and x + y, computed by one stack (so the rewrite shows)."""

    def pattern(x, y):
        return x * y, x + y

    def replacement(x, y):
        both = aten.stack.default([aten.mul.Tensor(x, y), aten.add.Tensor(x, y)])
        return aten.select.int(both, 0, 0), aten.select.int(both, 0, 1)

    def example_inputs():
        return dict(x=torch.randn(3, 4), y=torch.randn(3, 4))

    return FusionPass(
        "fuse_product_and_sum", 1, pattern=pattern, replacement=replacement, example_inputs=example_inputs
    )


@pytest.mark.parametrize("swap", [False, True])
def test_a_two_output_pattern_reroutes_both_outputs(swap):
    inputs = (torch.randn(3, 4), torch.randn(3, 4))
    gm = cleanup(trace(lambda x, y: ((x * y) + 1, ((y + x) if swap else (x + y)) * 3), *inputs))
    expected = run(gm, *inputs)

    assert _product_and_sum()(gm).matches == 1
    assert count(gm, aten.stack.default) == 1 and count(gm, aten.select.int) == 2
    assert_close(run(gm, *inputs), expected, torch.float32)
    check_meta(gm, *inputs)


def test_a_two_output_pattern_needs_both_outputs():
    inputs = (torch.randn(3, 4), torch.randn(3, 4))
    gm = cleanup(trace(lambda x, y: (x * y, x - y), *inputs))
    before = code(gm)
    assert _product_and_sum()(gm).matches == 0
    assert code(gm) == before


def test_add_rms_norm_reroutes_the_norm_and_the_sum():
    weight = torch.randn(16)
    inputs = (torch.randn(5, 16), torch.randn(5, 16))

    def fn(x, residual):
        h = x + residual
        return reference.rms_norm(h, weight, 1e-6) * 2, h * 3

    gm = cleanup(trace(fn, *inputs, weights={"w": weight}))
    expected = run(gm, *inputs)

    assert fuse_add_rms_norm(gm).matches == 1
    [fused] = [n for n in gm.graph.nodes if n.target is xllm.fused_add_rms_norm.default]
    assert sorted(user.args[1] for user in fused.users) == [0, 1]
    assert_close(run(gm, *inputs), expected, torch.float32)


# -- graphs without the pattern ------------------------------------------------------------------


def _near_misses(w1, w2):
    """Pieces of every pattern, none complete."""

    def fn(x, y, cos, sin):
        variance = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # a norm without its products
        gated = torch.sigmoid(x) * y  # not silu
        half = y.shape[-1] // 2
        rotated = x * cos + torch.cat((-y[..., half:], y[..., :half]), dim=-1) * sin  # x and y differ
        projected = F.linear(x, w1) + F.linear(x, w2)  # siblings, but no silu and no attention
        return variance * 3, gated, rotated, projected, (x + y) * 2

    return fn


def test_a_graph_without_any_pattern_is_left_byte_identical_by_every_pass():
    w1, w2 = torch.randn(8, 8), torch.randn(8, 8)
    inputs = (torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8))
    gm = trace(_near_misses(w1, w2), *inputs, weights={"a.weight": w1, "b.weight": w2})
    for graph_pass in default_pipeline():
        before = code(gm)
        result = graph_pass(gm)
        assert not result and result.matches == 0, graph_pass.name
        assert code(gm) == before, graph_pass.name


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_a_second_run_of_the_pipeline_finds_nothing_and_changes_nothing(architecture):
    gm = model_graph(architecture, 2)
    for graph_pass in default_pipeline():
        graph_pass(gm)
    for graph_pass in default_pipeline():
        before = code(gm)
        result = graph_pass(gm)
        assert not result and result.matches == 0, graph_pass.name
        assert code(gm) == before, graph_pass.name


# -- cost ----------------------------------------------------------------------------------------


def test_matching_work_grows_linearly_with_depth(monkeypatch):
    """Counts the matcher's node comparisons, not seconds: deterministic on any machine."""
    calls: collections.Counter = collections.Counter()
    match_node = PatternGraph._match_node

    def counted(self, *args, **kwargs):
        calls["match_node"] += 1
        return match_node(self, *args, **kwargs)

    monkeypatch.setattr(PatternGraph, "_match_node", counted)
    work = {}
    for depth in (4, 16):
        gm = model_graph("Qwen3ForCausalLM", depth)
        calls.clear()
        for graph_pass in default_pipeline():
            graph_pass(gm)
        work[depth] = calls["match_node"]
    assert work[16] / work[4] < 4.5, work  # 4 is linear; quadratic would be 16
