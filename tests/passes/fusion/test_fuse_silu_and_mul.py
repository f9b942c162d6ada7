"""fuse_silu_and_mul: SwiGLU's silu(gate) * up becomes xllm::silu_and_mul over the merged gate/up tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.passes.graphs import ARCHITECTURES, DEPTHS, aten, xllm
from xllm_compiler.ops import reference
from xllm_compiler.passes.fusion.fuse_silu_and_mul import fuse_silu_and_mul
from xllm_compiler.testing import assert_close, check_meta, check_pass, cleanup, code, count, passes_before, run, trace


@pytest.mark.parametrize("num_layers", DEPTHS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fuses_every_mlp_on_the_merged_projection(architecture, num_layers):
    layers = num_layers
    check_pass(
        fuse_silu_and_mul,
        architecture,
        layers,
        num_layers=num_layers,
        # The merged rule needs no copy: the only cats are rotary's rotate_half (2 per layer).
        ops_before={aten.silu.default: layers, xllm.silu_and_mul.default: 0, aten.cat.default: 2 * layers},
        ops_after={aten.silu.default: 0, xllm.silu_and_mul.default: layers, aten.cat.default: 2 * layers},
    )


@pytest.mark.parametrize("num_layers", DEPTHS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fuses_separate_gate_and_up_when_their_merge_is_disabled(architecture, num_layers):
    layers = num_layers
    prepare = [p for p in passes_before(fuse_silu_and_mul) if p.name != "merge_gate_up_projections"]
    check_pass(
        fuse_silu_and_mul,
        architecture,
        layers,
        num_layers=num_layers,
        prepare=prepare,
        ops_before={aten.linear.default: 5 * layers + 1, aten.split_with_sizes.default: layers},
        # One cat per MLP concatenates gate and up for the fused op.
        ops_after={aten.silu.default: 0, xllm.silu_and_mul.default: layers, aten.cat.default: 3 * layers},
    )


def _merged_mlp(weight, gate_first):
    def fn(x):
        gate_up = F.linear(x, weight)
        first, second = aten.split_with_sizes.default(gate_up, [12, 12], -1)
        return reference.silu_and_mul(first, second) if gate_first else reference.silu_and_mul(second, first)

    return fn


@pytest.mark.parametrize("gate_first", [True, False], ids=["gate-first", "up-first"])
def test_merged_layout_either_way_round(gate_first):
    # Gate first is the merged layout (no copy); up first is not, and the separate rule takes it.
    weight = torch.randn(24, 8)
    x = torch.randn(5, 8)
    gm = cleanup(trace(_merged_mlp(weight, gate_first), x, weights={"gate_up.weight": weight}))
    expected = run(gm, x)

    assert fuse_silu_and_mul(gm).matches == 1
    assert count(gm, aten.cat.default) == (0 if gate_first else 1)
    assert count(gm, aten.split_with_sizes.default) == (0 if gate_first else 1)
    assert_close(run(gm, x), expected, torch.float32)
    check_meta(gm, x)


def test_declines_when_the_silu_has_another_user():
    inputs = (torch.randn(5, 8), torch.randn(5, 8))
    gm = cleanup(trace(lambda gate, up: (F.silu(gate) * up, F.silu(gate)), *inputs))
    before = code(gm)
    assert fuse_silu_and_mul(gm).matches == 0
    assert code(gm) == before


def test_declines_a_product_with_a_scalar():
    x = torch.randn(5, 8)
    gm = cleanup(trace(lambda x: F.silu(x) * 2.0, x))
    before = code(gm)
    assert fuse_silu_and_mul(gm).matches == 0
    assert code(gm) == before


@pytest.mark.parametrize("up_shape", [(8,), (5, 1)], ids=["weight", "column"])
def test_a_broadcasting_product_is_declined(up_shape):
    # silu(x) * up with up broadcast to x's shape: the fused op multiplies equal halves, so it declines.
    scale = torch.randn(up_shape)
    x = torch.randn(5, 8)
    gm = cleanup(trace(lambda x: F.silu(x) * scale, x, weights={"scale": scale}))
    before, expected = code(gm), run(gm, x)

    assert fuse_silu_and_mul(gm).matches == 0

    assert code(gm) == before
    assert_close(run(gm, x), expected, torch.float32)
