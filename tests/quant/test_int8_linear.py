"""The int8 quantizer and ``xllm::linear_w8``'s kernels: composite, native (ops/cpu_quant.cpp), float reference.

Tolerances are the schemes' own error bounds, not fitted constants:

- the quantizer rounds to nearest, so each weight is off by at most half its row's scale;
- the composite is weight-only, so it is off the float linear by at most ``0.5 * scale[n] * sum_k |x[m, k]|``;
- the native kernel also rounds each input row to int8 (scale ``max|x[m]| / 127``), so it is off the
  composite by at most ``0.5 * x_scale[m] * sum_k |w_q[n, k]| * scale[n]``; against an emulation of that
  arithmetic in float64 (the int32 sums are exact) it agrees to float32 rounding, or one bfloat16 step.
"""

from __future__ import annotations

import pytest
import torch

from xllm_compiler.ops import KERNELS, native
from xllm_compiler.ops.quant import INT8_MAX, dequantize_per_channel, linear_w8_kernel, quantize_per_channel

ROWS = [1, 3, 8, 64, 512]
SHAPES = [(64, 64), (100, 37), (768, 768), (130, 2051), (1, 5)]  # (N, K): whole blocks, ragged N and K


def int8_dtypes() -> list[str]:
    module = native.native_kernels()
    return module.int8_linear_dtypes() if module is not None else []


def emulate(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The native kernel's arithmetic in torch: rows quantized as it does, integer sums exact in float64."""
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True)
    inverse = torch.full_like(amax, 127.0) / amax  # a true division (127.0 / t multiplies by a reciprocal)
    xq = torch.round(xf * torch.where(amax > 0, inverse, torch.zeros_like(amax)))
    y = (xq.double() @ q.double().T).float() * scale * (amax / 127.0)
    return (y if bias is None else y + bias.float()).to(x.dtype)


def test_quantizer_round_trips_within_half_a_step():
    weight = torch.randn(96, 200) * torch.logspace(-3, 1, 96)[:, None]  # rows of very different ranges
    weight[5] = 0.0
    q, scale = quantize_per_channel(weight)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (96,)
    assert int(q.abs().max()) == INT8_MAX and int(q.min()) >= -INT8_MAX
    error = (dequantize_per_channel(q, scale) - weight).abs()
    assert bool((error <= scale[:, None] / 2 * (1 + 1e-6)).all())
    assert bool((q[5] == 0).all()) and scale[5] == 1.0  # an all-zero row: no division by zero
    bf16_q, bf16_scale = quantize_per_channel(weight.to(torch.bfloat16))  # quantized from its float32 value
    assert torch.equal(bf16_q, quantize_per_channel(weight.to(torch.bfloat16).float())[0])
    assert torch.equal(bf16_scale, quantize_per_channel(weight.to(torch.bfloat16).float())[1])


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_composite_is_the_weight_only_linear(rows, shape):
    outputs, k_size = shape
    weight, x, bias = torch.randn(outputs, k_size), torch.randn(rows, k_size), torch.randn(outputs)
    q, scale = quantize_per_channel(weight)
    y = linear_w8_kernel(x, q, scale, bias)
    reference = torch.nn.functional.linear(x, dequantize_per_channel(q, scale), bias)  # sums in another order
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    bound = 0.5 * scale[None, :] * x.abs().sum(dim=1, keepdim=True)
    assert bool(((y - torch.nn.functional.linear(x, weight, bias)).abs() <= bound + 1e-4).all())
    out = torch.empty(rows, outputs)
    KERNELS["xllm::linear_w8_out"](x, q, scale, bias, out)
    assert torch.equal(out, y)


def test_pack_int8_weight_matches_the_layout():
    if not int8_dtypes():
        pytest.skip("this build has no int8 kernel (no AVX512-VNNI, no AVX2)")
    q = torch.randint(-127, 128, (100, 37), dtype=torch.int8)
    padded = torch.zeros(128, 40, dtype=torch.int8)
    padded[:100, :37] = q
    expected = padded.view(2, 64, 10, 4).permute(0, 2, 1, 3).contiguous().view(torch.uint8) ^ 128
    assert torch.equal(native.native_kernels().pack_int8_weight(q), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_native_kernel_against_its_arithmetic_and_the_composite(dtype, rows, shape):
    if str(dtype).removeprefix("torch.") not in int8_dtypes():
        pytest.skip(f"this build's int8 kernel takes no {dtype} inputs")
    module = native.native_kernels()
    outputs, k_size = shape
    torch.manual_seed(rows * 7 + k_size)
    q, scale = quantize_per_channel(torch.randn(outputs, k_size))
    x, bias = torch.randn(rows, k_size).to(dtype), torch.randn(outputs).to(dtype)
    x[0, 0] = 0.0
    if rows > 1:
        x[1] = 0.0  # an all-zero row: scale 0, output = bias
    packed = module.pack_int8_weight(q)
    out = torch.full((rows, outputs), float("nan"), dtype=dtype)
    module.int8_linear_out(x, packed, scale, bias, out)
    expected = emulate(x, q, scale, bias)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    else:  # both round one float32 value to bfloat16; the float32 values may differ in their last bits
        torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=1e-6)
    x_scale = x.float().abs().amax(dim=1, keepdim=True) / 127
    bound = 0.5 * x_scale * (q.float().abs().sum(dim=1) * scale)[None, :]
    composite = linear_w8_kernel(x, q, scale, bias).float()
    slack = 0 if dtype == torch.float32 else 2**-7 * composite.abs()  # two roundings to bfloat16
    assert bool(((out.float() - composite).abs() <= bound + slack + 1e-4).all())
    functional = module.int8_linear(x, packed, scale, bias, outputs)
    assert torch.equal(functional, out)
    if dtype == torch.bfloat16:  # the LM head's form, its float32 cast inside: bit for bit the cast's values
        assert torch.equal(module.int8_linear_float(x, packed, scale, bias, outputs), out.float())


def test_native_kernel_takes_a_batch_of_3d_rows_and_no_bias():
    if "float32" not in int8_dtypes():
        pytest.skip("this build has no float32 int8 kernel")
    module = native.native_kernels()
    torch.manual_seed(0)
    q, scale = quantize_per_channel(torch.randn(70, 48))
    x = torch.randn(2, 5, 48)
    y = module.int8_linear(x, module.pack_int8_weight(q), scale, None, 70)
    assert y.shape == (2, 5, 70)
    expected = emulate(x.reshape(10, 48), q, scale, None)  # float32 sums in another order: scaled tolerance
    torch.testing.assert_close(y.reshape(10, 70), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
