"""merge_qkv_projections: the q, k and v projections feeding one attention become one matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.passes.graphs import ARCHITECTURES, DEPTHS, aten, xllm
from xllm_compiler.passes.fusion.merge_qkv_projections import merge_qkv_projections
from xllm_compiler.testing import assert_close, check_meta, check_pass, cleanup, code, count, run, trace


@pytest.mark.parametrize("num_layers", DEPTHS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_merges_every_layers_projections(architecture, num_layers):
    layers = num_layers
    bias = architecture == "Qwen2ForCausalLM"
    check_pass(
        merge_qkv_projections,
        architecture,
        layers,
        num_layers=num_layers,
        # Per layer q, k, v, o, gate, up, down, plus the LM head.
        ops_before={
            aten.linear.default: 7 * layers + 1,
            aten.split_with_sizes.default: 0,
            aten.cat.default: 2 * layers,
        },
        # A weight cat per layer (and a bias cat for Qwen2), left for fold_constants; rotary's 2 cats stay.
        ops_after={
            aten.linear.default: 5 * layers + 1,
            aten.split_with_sizes.default: layers,
            aten.cat.default: 2 * layers + layers * (2 if bias else 1),
        },
    )


HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 2, 1, 4, 8


def _weights(biases=(False, False, False)):
    weights = {}
    for name, rows, has_bias in zip(
        "qkv", (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM), biases, strict=True
    ):
        weights[f"attn.{name}_proj.weight"] = torch.randn(rows, HIDDEN)
        if has_bias:
            weights[f"attn.{name}_proj.bias"] = torch.randn(rows)
    return weights


def _project(x, weights, name):
    return F.linear(x, weights[f"attn.{name}_proj.weight"], weights.get(f"attn.{name}_proj.bias"))


def _attend(q, k, v, cache, meta):
    return xllm.paged_attention.default(
        q.view(-1, HEADS, HEAD_DIM),
        k.view(-1, KV_HEADS, HEAD_DIM),
        v.view(-1, KV_HEADS, HEAD_DIM),
        cache,
        *meta,
        0.5,
        0,
    )


def _step_inputs(tokens=3):
    """x, kv cache and metadata of one prefill of ``tokens`` tokens in block 1."""
    return (
        torch.randn(tokens, HIDDEN),
        torch.zeros(2, 2, 4, KV_HEADS, HEAD_DIM),
        torch.arange(4, 4 + tokens),
        torch.tensor([tokens], dtype=torch.int32),
        torch.tensor([tokens], dtype=torch.int32),
        torch.tensor([[1]], dtype=torch.int32),
    )


@pytest.mark.parametrize("bias", [False, True])
def test_merges_a_hand_built_attention_and_names_the_merged_weight(bias):
    weights = _weights((bias, bias, bias))

    def fn(x, cache, *meta):
        q, k, v = (_project(x, weights, n) for n in "qkv")
        return _attend(q, k, v, cache, meta)

    inputs = _step_inputs()
    gm = cleanup(trace(fn, *inputs, weights=weights))
    expected = run(gm, *inputs)

    assert merge_qkv_projections(gm).matches == 1
    assert count(gm, aten.linear.default) == 1
    cats = [n for n in gm.graph.nodes if n.target is aten.cat.default]
    names = ["attn.qkv_proj.weight"] + (["attn.qkv_proj.bias"] if bias else [])
    assert [n.meta["constant_name"] for n in cats] == names
    assert_close(run(gm, *inputs), expected, torch.float32)
    check_meta(gm, *inputs)


def test_orders_the_merged_weight_q_k_v_whatever_the_graph_order():
    weights = _weights()

    def fn(x, cache, *meta):
        v, k, q = (_project(x, weights, n) for n in "vkq")
        return _attend(q, k, v, cache, meta)

    inputs = _step_inputs()
    gm = cleanup(trace(fn, *inputs, weights=weights))
    expected = run(gm, *inputs)

    assert merge_qkv_projections(gm).matches == 1
    [cat] = [n for n in gm.graph.nodes if n.target is aten.cat.default]
    assert [w.target for w in cat.args[0]] == [f"attn.{n}_proj.weight" for n in "qkv"]
    assert_close(run(gm, *inputs), expected, torch.float32)


@pytest.mark.parametrize("biases", [(True, False, False), (False, True, True)], ids=["q-only", "k-and-v"])
def test_declines_when_only_some_projections_have_a_bias(biases):
    weights = _weights(biases)

    def fn(x, cache, *meta):
        return _attend(*(_project(x, weights, n) for n in "qkv"), cache, meta)

    gm = cleanup(trace(fn, *_step_inputs(), weights=weights))
    before = code(gm)
    assert merge_qkv_projections(gm).matches == 0
    assert code(gm) == before


def test_declines_projections_that_feed_two_attentions():
    weights = _weights()
    other = torch.randn(KV_HEADS * HEAD_DIM, HIDDEN)

    def fn(x, y, cache, *meta):
        q, k, v = (_project(x, weights, n) for n in "qkv")
        first = _attend(q, k, F.linear(y, other), cache, meta)
        second = _attend(q * 2, F.linear(y, other), v, cache, meta)
        return first + second

    x, *rest = _step_inputs()
    gm = cleanup(trace(fn, x, torch.randn_like(x), *rest, weights={**weights, "other.weight": other}))
    before = code(gm)
    assert merge_qkv_projections(gm).matches == 0
    assert code(gm) == before


def test_declines_three_projections_of_which_one_does_not_reach_attention():
    weights = _weights()
    extra = torch.randn(KV_HEADS * HEAD_DIM, HIDDEN)

    def fn(x, y, cache, *meta):
        q, k, unrelated = _project(x, weights, "q"), _project(x, weights, "k"), F.linear(x, extra)
        return _attend(q, k, F.linear(y, weights["attn.v_proj.weight"]), cache, meta), unrelated

    x, *rest = _step_inputs()
    gm = cleanup(trace(fn, x, torch.randn_like(x), *rest, weights={**weights, "extra.weight": extra}))
    before = code(gm)
    assert merge_qkv_projections(gm).matches == 0
    assert code(gm) == before
