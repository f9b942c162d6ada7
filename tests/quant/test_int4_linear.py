"""``xllm::linear_w4``'s CPU kernel (ops/cpu_int4.cpp) against its arithmetic and the op's composite, and the
CPU platform running it on packed weights.

The kernel rounds each group of each input row to int8 (scale ``max|x| / 127`` over the group) and sums the
products exactly in int32, so against an emulation of that arithmetic in float64 it agrees to float32
rounding (one bfloat16 step for bfloat16 outputs). It is off the weight-only composite by the inputs'
rounding alone, which reaches the ``q * scale`` part of each weight only (the offset multiplies the group's
exact sum of x): at most ``0.5 * x_scale[m, g] * sum_{k in g} q[n, k] * scale[n, g]`` summed over the
groups, the bound asserted here.
"""

from __future__ import annotations

import pytest
import torch

import xllm_compiler
from xllm_compiler.ops import native
from xllm_compiler.ops.quant import (
    GROUP_SIZES,
    linear_w4_kernel,
    pack_int4,
    quantize_per_group,
    unpack_int4,
)

ROWS = [1, 3, 8, 64, 512]
SHAPES = [(64, 64), (100, 37), (768, 768), (130, 2051), (1, 5)]  # (N, K): whole blocks, ragged N and K


def int4_dtypes() -> list[str]:
    module = native.native_kernels()
    return module.int4_linear_dtypes() if module is not None else []


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[rows, G, group_size] of float32 rows, zero-padded to whole groups."""
    groups = -(-x.shape[1] // group_size)
    return torch.nn.functional.pad(x.float(), (0, groups * group_size - x.shape[1])).view(x.shape[0], groups, -1)


def emulate(x, qweight, scale, offset, group_size, bias) -> torch.Tensor:
    """The kernel's arithmetic in torch: each group of a row rounded to int8 as it does, integer sums exact."""
    k_size = x.shape[1]
    grouped = _grouped(x, group_size)
    amax = grouped.abs().amax(dim=2, keepdim=True)
    inverse = torch.full_like(amax, 127.0) / amax  # a true division, as the kernel's 127.f / max
    xq = torch.round(grouped * torch.where(amax > 0, inverse, torch.zeros_like(amax)))
    q = _grouped(unpack_int4(qweight, k_size), group_size).double()
    dots = torch.einsum("rgk,ngk->rng", xq.double(), q)
    x_scale, x_sum = (amax[..., 0] / 127.0).double(), grouped.sum(dim=2).double()
    y = (dots * scale.double() * x_scale[:, None, :] + offset.double() * x_sum[:, None, :]).sum(dim=2).float()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def test_pack_int4_weight_matches_the_layout():
    if not int4_dtypes():
        pytest.skip("this build has no int4 kernel (no AVX2 with FMA)")
    module = native.native_kernels()
    q = torch.randint(0, 16, (40, 75), dtype=torch.uint8)
    packed = module.pack_int4_weight(pack_int4(q), 75, 32)
    assert packed.shape == (2, 96 // 8, 32, 4)
    padded = torch.zeros(64, 96, dtype=torch.uint8)
    padded[:40, :75] = q
    for block, step, lane, byte in [(0, 0, 0, 0), (0, 3, 7, 2), (1, 9, 7, 3), (1, 11, 31, 1), (0, 5, 20, 0)]:
        n, k = 32 * block + lane, 8 * step + byte
        assert int(packed[block, step, lane, byte]) == int(padded[n, k]) | int(padded[n, k + 4]) << 4
    scales = torch.randn(40, 3)
    packed_scales = module.pack_int4_scales(scales)
    assert packed_scales.shape == (2, 3, 32)
    assert torch.equal(packed_scales[1, :, :8], scales[32:].T) and bool((packed_scales[1, :, 8:] == 0).all())


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_native_kernel_against_its_arithmetic_and_the_composite(shape, rows, dtype, group_size):
    if str(dtype).removeprefix("torch.") not in int4_dtypes():
        pytest.skip(f"this build's int4 kernel takes no {dtype} inputs")
    module = native.native_kernels()
    outputs, k_size = shape
    torch.manual_seed(rows * 7 + k_size + group_size)
    qweight, scale, offset = quantize_per_group(torch.randn(outputs, k_size), group_size)
    x, bias = torch.randn(rows, k_size).to(dtype), torch.randn(outputs).to(dtype)
    x[0, 0] = 0.0
    if rows > 1:
        x[1] = 0.0  # an all-zero row: scale 0, output = bias
    packed = [module.pack_int4_weight(qweight, k_size, group_size), *map(module.pack_int4_scales, (scale, offset))]
    out = torch.full((rows, outputs), float("nan"), dtype=dtype)
    module.int4_linear_out(x, *packed, group_size, bias, out)
    expected = emulate(x, qweight, scale, offset, group_size, bias)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    else:  # both round one float32 value to bfloat16; the float32 values may differ in their last bits
        torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=1e-5 * float(expected.abs().max()))
    x_scale = _grouped(x, group_size).abs().amax(dim=2) / 127  # [rows, G]
    magnitude = _grouped(unpack_int4(qweight, k_size), group_size).sum(dim=2) * scale  # [N, G]
    bound = 0.5 * x_scale @ magnitude.T
    composite = linear_w4_kernel(x, qweight, scale, offset, group_size, bias).float()
    slack = 0 if dtype == torch.float32 else 2**-7 * composite.abs()  # two roundings to bfloat16
    assert bool(((out.float() - composite).abs() <= bound + slack + 1e-4).all())
    assert torch.equal(module.int4_linear(x, *packed, group_size, bias, outputs), out)
    if dtype == torch.bfloat16:  # the LM head's form, its float32 cast inside: bit for bit the cast's values
        assert torch.equal(module.int4_linear_float(x, *packed, group_size, bias, outputs), out.float())


def test_native_kernel_takes_a_batch_of_3d_rows_and_no_bias():
    if "float32" not in int4_dtypes():
        pytest.skip("this build has no float32 int4 kernel")
    module = native.native_kernels()
    torch.manual_seed(0)
    qweight, scale, offset = quantize_per_group(torch.randn(70, 96), 64)
    x = torch.randn(2, 5, 96)
    packed = [module.pack_int4_weight(qweight, 96, 64), *map(module.pack_int4_scales, (scale, offset))]
    y = module.int4_linear(x, *packed, 64, None, 70)
    assert y.shape == (2, 5, 70)
    expected = emulate(x.reshape(10, 96), qweight, scale, offset, 64, None)
    torch.testing.assert_close(y.reshape(10, 70), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_the_cpu_runs_the_int4_kernel_on_packed_weights(checkpoints):
    module = native.native_kernels()
    if module is None or "float32" not in module.int4_linear_dtypes():
        pytest.skip("no int4 kernel in this build: the composite runs")
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    buckets = dict(decode_buckets=[1, 2], prefill_buckets=[32])
    model = xllm_compiler.load(checkpoints.artifact(model_dir, dtype="float32", quantize="int4", **buckets))
    layers = model.manifest.model.num_layers
    for name, graph in model.engine.graphs._graphs.items():
        targets = [n.target for n in graph.nodes if n.op == "call_function"]
        assert sum(t in (module.int4_linear_out, module.int4_linear) for t in targets) == 4 * layers + 1, name
        assert not any(getattr(t, "__name__", "").startswith("linear_w4") for t in targets), name
    assert not any(name.endswith(("_int4", "_offset")) for name in model.engine.graphs._weights), "plain copies kept"
