"""fuse_add_rms_norm: residual add + RMSNorm become one xllm::fused_add_rms_norm with both outputs."""

from __future__ import annotations

import pytest
import torch

from tests.passes.graphs import ARCHITECTURES, DEPTHS, aten, xllm
from xllm_compiler.ops import reference
from xllm_compiler.passes.fusion.fuse_add_rms_norm import fuse_add_rms_norm
from xllm_compiler.testing import assert_close, check_meta, check_pass, cleanup, code, count, run, trace


@pytest.mark.parametrize("num_layers", DEPTHS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fuses_every_residual_norm(architecture, num_layers):
    # Per layer: the post-attention norm and the next layer's (or the final) norm follow a residual add.
    fused = 2 * num_layers
    plain = 1 + (2 * num_layers if architecture == "Qwen3ForCausalLM" else 0)
    check_pass(
        fuse_add_rms_norm,
        architecture,
        fused,
        num_layers=num_layers,
        ops_before={aten.pow.Tensor_Scalar: fused + plain, xllm.fused_add_rms_norm.default: 0},
        ops_after={
            aten.pow.Tensor_Scalar: plain,
            aten.rsqrt.default: plain,
            xllm.fused_add_rms_norm.default: fused,
            xllm.rms_norm.default: 0,
        },
    )


def _two_blocks(weights, eps):
    """Two residual blocks, each norm with its own eps; the sums flow on as the residual stream."""

    def fn(x, residual):
        h = x + residual
        y = reference.rms_norm(h, weights[0], eps[0])
        h2 = (y * 0.5) + h
        return reference.rms_norm(h2, weights[1], eps[1]), h2

    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_norm_keeps_its_own_eps(dtype):
    weights = [torch.randn(16, dtype=dtype), torch.randn(16, dtype=dtype)]
    inputs = (torch.randn(5, 16, dtype=dtype), torch.randn(5, 16, dtype=dtype))
    gm = cleanup(trace(_two_blocks(weights, (1e-5, 1e-6)), *inputs, weights={"w0": weights[0], "w1": weights[1]}))
    expected = run(gm, *inputs)

    assert fuse_add_rms_norm(gm).matches == 2
    fused = [n for n in gm.graph.nodes if n.target is xllm.fused_add_rms_norm.default]
    assert [n.args[3] for n in fused] == [1e-5, 1e-6]
    assert count(gm, aten.add.Tensor) == count(gm, aten.pow.Tensor_Scalar) == 0
    assert_close(run(gm, *inputs), expected, dtype)
    check_meta(gm, *inputs)


def test_declines_an_add_of_a_constant_which_plain_rms_norm_then_takes():
    from xllm_compiler.passes.fusion.fuse_rms_norm import fuse_rms_norm

    weight = torch.randn(16)
    x = torch.randn(5, 16)
    gm = cleanup(trace(lambda x: reference.rms_norm(x + 1.0, weight, 1e-6), x, weights={"w": weight}))
    before, expected = code(gm), run(gm, x)

    assert fuse_add_rms_norm(gm).matches == 0
    assert code(gm) == before
    assert fuse_rms_norm(gm).matches == 1
    assert_close(run(gm, x), expected, torch.float32)


def test_declines_when_the_variance_has_another_user():
    weight = torch.randn(16)
    inputs = (torch.randn(5, 16), torch.randn(5, 16))

    def fn(x, residual):
        h = x + residual
        variance = h.pow(2).mean(-1, keepdim=True)
        return weight * (h * torch.rsqrt(variance + 1e-6)), variance

    gm = cleanup(trace(fn, *inputs, weights={"w": weight}))
    before = code(gm)
    assert fuse_add_rms_norm(gm).matches == 0
    assert code(gm) == before


def test_a_broadcasting_add_is_declined():
    # bias + x with the bias broadcast over the rows: the fused op adds equal shapes, so it declines.
    bias, weight = torch.randn(16), torch.randn(16)
    x = torch.randn(5, 16)
    gm = cleanup(trace(lambda x: reference.rms_norm(bias + x, weight, 1e-6), x, weights={"b": bias, "w": weight}))
    before, expected = code(gm), run(gm, x)

    assert fuse_add_rms_norm(gm).matches == 0

    assert code(gm) == before
    assert_close(run(gm, x), expected, torch.float32)
