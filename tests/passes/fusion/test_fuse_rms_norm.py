"""fuse_rms_norm: every RMSNorm without a residual add before it becomes one xllm::rms_norm."""

from __future__ import annotations

import pytest
import torch

from tests.passes.graphs import ARCHITECTURES, DEPTHS, aten, xllm
from xllm_compiler.ops import reference
from xllm_compiler.passes.fusion.fuse_rms_norm import fuse_rms_norm
from xllm_compiler.testing import assert_close, check_pass, cleanup, code, count, run, trace


@pytest.mark.parametrize("num_layers", DEPTHS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fuses_the_first_input_norm_and_qk_norms(architecture, num_layers):
    # The residual add+norms (2L) are fused already; what is left is layer 0's input norm, and for
    # Qwen3 the q and k norms of every layer.
    norms = 1 + (2 * num_layers if architecture == "Qwen3ForCausalLM" else 0)
    check_pass(
        fuse_rms_norm,
        architecture,
        norms,
        num_layers=num_layers,
        ops_before={
            aten.pow.Tensor_Scalar: norms,
            aten.rsqrt.default: norms,
            xllm.rms_norm.default: 0,
            xllm.fused_add_rms_norm.default: 2 * num_layers,
        },
        ops_after={
            aten.pow.Tensor_Scalar: 0,
            aten.rsqrt.default: 0,
            aten.mean.dim: 0,
            xllm.rms_norm.default: norms,
            xllm.fused_add_rms_norm.default: 2 * num_layers,
        },
    )


def _norm_exposing(x, weight, eps, exposed):
    """reference.rms_norm written out, also returning one of its intermediates."""
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    inverse = torch.rsqrt(variance + eps)
    out = weight * (h * inverse).to(x.dtype)
    return out, {"variance": variance, "rsqrt": inverse}[exposed]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exposed", ["variance", "rsqrt"])
def test_declines_when_an_intermediate_has_another_user(exposed, dtype):
    weight = torch.randn(16, dtype=dtype)
    x = torch.randn(5, 16, dtype=dtype)
    gm = cleanup(trace(lambda x: _norm_exposing(x, weight, 1e-6, exposed), x, weights={"norm.weight": weight}))
    before, expected = code(gm), run(gm, x)

    result = fuse_rms_norm(gm)

    assert not result and result.matches == 0
    assert code(gm) == before
    assert_close(run(gm, x), expected, dtype)


def test_declines_when_eps_is_a_tensor_not_a_literal():
    weight = torch.randn(16)
    x, eps = torch.randn(5, 16), torch.tensor(1e-6)
    gm = cleanup(trace(lambda x, eps: reference.rms_norm(x, weight, eps), x, eps, weights={"norm.weight": weight}))

    assert fuse_rms_norm(gm).matches == 0
    assert count(gm, xllm.rms_norm.default) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuses_a_hand_built_norm_with_its_own_eps(dtype):
    weight = torch.randn(12, dtype=dtype)
    x = torch.randn(4, 12, dtype=dtype)
    gm = cleanup(trace(lambda x: reference.rms_norm(x, weight, 3e-5) * 2, x, weights={"norm.weight": weight}))
    expected = run(gm, x)

    assert fuse_rms_norm(gm).matches == 1
    [fused] = [n for n in gm.graph.nodes if n.target is xllm.rms_norm.default]
    assert fused.args[2] == 3e-5
    assert count(gm, aten.pow.Tensor_Scalar) == count(gm, aten.to.dtype) == 0
    assert_close(run(gm, x), expected, dtype)
