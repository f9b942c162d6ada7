"""The int4 quantizer and ``xllm::linear_w4``'s composite: round trip, nibble layout, the weight-only linear.

Tolerances are the scheme's own bounds: each weight is off by at most half its group's scale (round to
nearest over [min, max] in 15 steps); the composite dequantizes to float32 and calls F.linear, so it equals
F.linear on the dequantized weight up to float32 summation order (1e-5 relative).
"""

from __future__ import annotations

import pytest
import torch

from xllm_compiler.ops import KERNELS, OUT_FORMS
from xllm_compiler.ops.quant import (
    INT4_MAX,
    dequantize_per_group,
    linear_w4_kernel,
    linear_w4_out_kernel,
    quantize_per_group,
)

ROWS = [1, 3, 8, 64, 512]
SHAPES = [(64, 256), (37, 100), (48, 77), (1, 5)]  # (N, K): whole groups, a partial last group, odd K, K < group


def unpack(qweight: torch.Tensor, k_size: int) -> torch.Tensor:
    """An independent reading of the layout: element (n, k) in byte k // 2, low nibble for even k."""
    values = torch.empty(qweight.shape[0], k_size, dtype=torch.int64)
    for k in range(k_size):
        byte = qweight[:, k // 2].to(torch.int64)
        values[:, k] = byte % 16 if k % 2 == 0 else byte // 16
    return values


def _within_half_a_step(weight: torch.Tensor, group_size: int) -> None:
    q, scale, offset = quantize_per_group(weight, group_size)
    rows, k_size = weight.shape
    groups = -(-k_size // group_size)
    assert q.dtype == torch.uint8 and q.shape == (rows, -(-k_size // 2))
    assert scale.dtype == offset.dtype == torch.float32 and scale.shape == offset.shape == (rows, groups)
    per_element = scale.repeat_interleave(group_size, dim=1)[:, :k_size]
    error = (dequantize_per_group(q, scale, offset, k_size, group_size) - weight.float()).abs()
    assert bool((error <= per_element / 2 * (1 + 1e-5) + 1e-7).all())
    values = unpack(q, k_size)
    assert int(values.max()) <= INT4_MAX


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("k_size", [256, 200, 77, 5])
def test_quantizer_round_trips_within_half_a_step(group_size, k_size):
    weight = torch.randn(24, k_size) * torch.logspace(-3, 1, 24)[:, None]  # rows of very different ranges
    _within_half_a_step(weight, group_size)


def test_each_group_has_its_own_range():
    weight = torch.randn(4, 200)
    weight[:, 64:128] *= 100  # one loud group: the others keep fine steps
    q, scale, offset = quantize_per_group(weight, 64)
    assert scale.shape == (4, 4)
    assert bool((scale[:, 1] > 20 * scale[:, 0]).all()) and bool((scale[:, 2] < scale[:, 1] / 20).all())
    for g, (start, end) in enumerate([(0, 64), (64, 128), (128, 192), (192, 200)]):  # the last group has 8
        block = weight[:, start:end]
        assert torch.equal(offset[:, g], block.amin(dim=1))
        torch.testing.assert_close(scale[:, g], (block.amax(dim=1) - block.amin(dim=1)) / INT4_MAX)
        values = unpack(q, 200)[:, start:end]
        assert bool((values.amin(dim=1) == 0).all()) and bool((values.amax(dim=1) == INT4_MAX).all())


def test_a_constant_group_is_exact_with_scale_one():
    weight = torch.randn(3, 96)
    weight[:, 32:64] = 0.25
    weight[1, :] = -2.0  # a constant row
    q, scale, offset = quantize_per_group(weight, 32)
    assert bool((scale[:, 1] == 1.0).all()) and offset[:, 1].tolist() == [0.25, -2.0, 0.25]
    assert bool((scale[1] == 1.0).all()) and bool((unpack(q, 96)[1] == 0).all())
    assert torch.equal(dequantize_per_group(q, scale, offset, 96, 32)[:, 32:64], weight[:, 32:64])


def test_bfloat16_is_quantized_from_its_float32_value():
    weight = torch.randn(16, 100).to(torch.bfloat16)
    for got, expected in zip(quantize_per_group(weight, 32), quantize_per_group(weight.float(), 32), strict=True):
        assert torch.equal(got, expected)
    _within_half_a_step(weight, 32)


def test_nibble_layout_and_padding():
    weight = torch.arange(7, dtype=torch.float32).repeat(2, 1)  # one group: min 0, max 6, q = round(k * 15 / 6)
    q, scale, offset = quantize_per_group(weight, 32)
    expected = torch.round(torch.arange(7) * INT4_MAX / 6).to(torch.int64)
    assert torch.equal(unpack(q, 7), expected.repeat(2, 1))
    assert q.shape == (2, 4) and bool((q[:, 3] >> 4 == 0).all())  # odd K: the padding nibble is 0
    assert int(q[0, 0]) == int(expected[0]) | int(expected[1]) << 4  # even k low, odd k high
    generator = torch.Generator().manual_seed(0)
    q, scale, offset = quantize_per_group(torch.randn(33, 301, generator=generator), 64)
    values = unpack(q, 301).to(torch.float32)
    manual = values * scale.repeat_interleave(64, dim=1)[:, :301] + offset.repeat_interleave(64, dim=1)[:, :301]
    assert torch.equal(dequantize_per_group(q, scale, offset, 301, 64), manual)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_composite_is_the_linear_on_the_dequantized_weight(rows, shape):
    outputs, k_size = shape
    weight, x, bias = torch.randn(outputs, k_size), torch.randn(rows, k_size), torch.randn(outputs)
    q, scale, offset = quantize_per_group(weight, 32)
    reference = torch.nn.functional.linear(x, dequantize_per_group(q, scale, offset, k_size, 32), bias)
    y = linear_w4_kernel(x, q, scale, offset, 32, bias)
    assert y.shape == (rows, outputs) and y.dtype == torch.float32
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    op = torch.ops.xllm.linear_w4(x.view(1, rows, k_size), q, scale, offset, 32, None)
    assert torch.equal(op.view(rows, outputs), linear_w4_kernel(x, q, scale, offset, 32))
    out = torch.empty(rows, outputs)
    linear_w4_out_kernel(x, q, scale, offset, 32, bias, out)
    assert torch.equal(out, y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_composite_computes_in_float32_and_returns_x_dtype(dtype):
    q, scale, offset = quantize_per_group(torch.randn(40, 130), 64)
    x, bias = torch.randn(3, 130).to(dtype), torch.randn(40).to(dtype)
    y = linear_w4_kernel(x, q, scale, offset, 64, bias)
    weight = dequantize_per_group(q, scale, offset, 130, 64)
    assert y.dtype == dtype
    assert torch.equal(y, (torch.nn.functional.linear(x.float(), weight) + bias.float()).to(dtype))
    out = torch.empty(3, 40, dtype=dtype)
    torch.ops.xllm.linear_w4_out(x, q, scale, offset, 64, bias, out)
    assert torch.equal(out, y)


def test_the_op_is_registered_with_its_out_form():
    assert KERNELS["xllm::linear_w4"] is linear_w4_kernel and KERNELS["xllm::linear_w4_out"] is linear_w4_out_kernel
    assert OUT_FORMS["xllm::linear_w4"] == ("xllm::linear_w4_out", ("out",))
    with torch._subclasses.FakeTensorMode():
        x, q = torch.empty(2, 7, 100), torch.empty(48, 50, dtype=torch.uint8)
        y = torch.ops.xllm.linear_w4(x, q, torch.empty(48, 4), torch.empty(48, 4), 32, None)
        assert y.shape == (2, 7, 48)
