"""merge_gate_up_projections: an MLP's gate and up projections become one matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.passes.graphs import ARCHITECTURES, DEPTHS, aten
from xllm_compiler.ops import reference
from xllm_compiler.ops.quant import quantize_per_group
from xllm_compiler.passes.fusion.merge_gate_up_projections import merge_gate_up_projections
from xllm_compiler.testing import assert_close, check_meta, check_pass, cleanup, code, count, run, trace


@pytest.mark.parametrize("num_layers", DEPTHS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_merges_every_mlps_gate_and_up(architecture, num_layers):
    layers = num_layers
    check_pass(
        merge_gate_up_projections,
        architecture,
        layers,
        num_layers=num_layers,
        # q/k/v are merged already: qkv, o, gate, up, down per layer, plus the LM head.
        ops_before={aten.linear.default: 5 * layers + 1, aten.split_with_sizes.default: layers},
        ops_after={aten.linear.default: 4 * layers + 1, aten.split_with_sizes.default: 2 * layers},
    )


def _mlp_weights(bias=(False, False)):
    weights = {"mlp.gate_proj.weight": torch.randn(12, 8), "mlp.up_proj.weight": torch.randn(12, 8)}
    for name, has_bias in zip(("gate", "up"), bias, strict=True):
        if has_bias:
            weights[f"mlp.{name}_proj.bias"] = torch.randn(12)
    return weights


def _linear(x, weights, name):
    return F.linear(x, weights[f"mlp.{name}_proj.weight"], weights.get(f"mlp.{name}_proj.bias"))


@pytest.mark.parametrize("up_first", [False, True], ids=["gate-first", "up-first"])
def test_merges_a_hand_built_mlp_gate_first(up_first):
    weights = _mlp_weights()

    def fn(x):
        if up_first:
            up, gate = _linear(x, weights, "up"), _linear(x, weights, "gate")
        else:
            gate, up = _linear(x, weights, "gate"), _linear(x, weights, "up")
        return reference.silu_and_mul(gate, up)

    x = torch.randn(5, 8)
    gm = cleanup(trace(fn, x, weights=weights))
    expected = run(gm, x)

    assert merge_gate_up_projections(gm).matches == 1
    assert count(gm, aten.linear.default) == 1
    [cat] = [n for n in gm.graph.nodes if n.target is aten.cat.default]
    assert [w.target for w in cat.args[0]] == ["mlp.gate_proj.weight", "mlp.up_proj.weight"]
    assert cat.meta["constant_name"] == "mlp.gate_up_proj.weight"
    assert_close(run(gm, x), expected, torch.float32)
    check_meta(gm, x)


INT4_PARTS = ("qweight", "scale", "offset")


def test_merges_int4_gate_and_up_of_a_4bit_checkpoint():
    """linear_w4 layers (a GPTQ / AWQ checkpoint's, models/int4_linear.py) merge alike: qweight, scale and
    offset each concatenated by rows, the group size kept."""
    weights = {}
    for name in ("gate", "up"):
        parts = zip(INT4_PARTS, quantize_per_group(torch.randn(12, 64), 32), strict=True)
        weights.update({f"mlp.{name}_proj.{part}": tensor for part, tensor in parts})

    def int4(x, name):
        parts = [weights[f"mlp.{name}_proj.{part}"] for part in INT4_PARTS]
        return torch.ops.xllm.linear_w4(x, *parts, 32)

    x = torch.randn(5, 64)
    gm = cleanup(trace(lambda x: reference.silu_and_mul(int4(x, "gate"), int4(x, "up")), x, weights=weights))
    expected = run(gm, x)

    assert merge_gate_up_projections(gm).matches == 1
    assert count(gm, torch.ops.xllm.linear_w4.default) == 1
    cats = [n for n in gm.graph.nodes if n.target is aten.cat.default]
    assert [c.meta["constant_name"] for c in cats] == [f"mlp.gate_up_proj.{part}" for part in INT4_PARTS]
    assert_close(run(gm, x), expected, torch.float32)
    check_meta(gm, x)


def _declines(fn, weights):
    x = torch.randn(5, 8)
    gm = cleanup(trace(fn, x, weights=weights))
    before = code(gm)
    assert merge_gate_up_projections(gm).matches == 0
    assert code(gm) == before


def test_declines_two_projections_without_silu():
    weights = _mlp_weights()
    _declines(lambda x: _linear(x, weights, "gate") * _linear(x, weights, "up"), weights)


def test_declines_when_the_gate_has_another_user():
    weights = _mlp_weights()

    def fn(x):
        gate = _linear(x, weights, "gate")
        return reference.silu_and_mul(gate, _linear(x, weights, "up")), gate

    _declines(fn, weights)


def test_declines_when_only_one_has_a_bias():
    weights = _mlp_weights(bias=(True, False))
    _declines(lambda x: reference.silu_and_mul(_linear(x, weights, "gate"), _linear(x, weights, "up")), weights)


def test_declines_a_third_projection_of_the_same_input():
    weights = {**_mlp_weights(), "mlp.extra.weight": torch.randn(12, 8)}

    def fn(x):
        gated = reference.silu_and_mul(_linear(x, weights, "gate"), _linear(x, weights, "up"))
        return gated + F.linear(x, weights["mlp.extra.weight"])

    _declines(fn, weights)


def test_merges_when_weights_are_read_where_they_are_used():
    # fold_constants and make_fx place get_attr nodes next to their user, not at the top of the graph.
    weights = _mlp_weights()
    x = torch.randn(5, 8)

    def fn(x):
        return reference.silu_and_mul(_linear(x, weights, "gate"), _linear(x, weights, "up"))

    gm = cleanup(trace(fn, x, weights=weights, weights_first=False))
    expected = run(gm, x)

    assert merge_gate_up_projections(gm).matches == 1
    gm.graph.lint()
    assert_close(run(gm, x), expected, torch.float32)
