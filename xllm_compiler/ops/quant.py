"""``xllm::linear_w8``: a linear layer on int8 weights, symmetric per output channel, with float scales.

``y = x @ (qweight * scale[:, None]).T + bias``: ``qweight [N, K]`` int8 in [-127, 127], ``scale [N]``
float32, ``bias [N]`` in x's dtype or None; ``y`` has x's dtype. What the op means is that weight-only
arithmetic, and the composite here computes exactly it (float32 sums): the oracle of the tests and what
every device without a kernel of its own runs. The CPU kernel (ops/cpu_quant.cpp) also quantizes each
input row to int8 on the fly, so its results differ from the composite by that rounding (bounded in
tests/quant). ``quantize_per_channel`` is the one quantizer: the compile pass and the tests call it.

Why per output channel and symmetric: one float scale per row of the weight keeps the int8 dot products
free of zero-point corrections, and the scale folds into the output once per column.

``xllm::linear_w4``: a linear layer on int4 weights, asymmetric per group of ``group_size`` consecutive
inputs of each output row. ``y = x @ W.T + bias`` with ``W = dequantize_per_group(qweight, scale, offset,
K, group_size)``: ``qweight [N, ceil(K/2)]`` uint8, two values in [0, 15] a byte (element (n, k) in byte
k // 2, the low nibble for even k), ``scale`` and ``offset [N, ceil(K/group_size)]`` float32, ``W ~= q *
scale + offset``. The composite dequantizes to float32 and sums in float32; the CPU kernel
(ops/cpu_int4.cpp) rounds each group of its inputs to int8 on the fly (bounded in
tests/quant/test_int4_linear.py). ``quantize_per_group`` is its one quantizer. Why per group and
asymmetric: sixteen levels over a whole row would leave most weights a step or two from zero; a group of
32 to 128 inputs has a range of its own, and a min/max offset spends all sixteen levels on it instead of
half of them on a sign the group may not use.
"""

from __future__ import annotations

import functools

import torch

#: Largest magnitude of a quantized value: symmetric, so -128 is never used and -q is always representable.
INT8_MAX = 127
#: Largest int4 value: unsigned, q in [0, 15] above each group's minimum.
INT4_MAX = 15
#: The int4 group sizes the compiler offers (--group-size); 128 is GPTQ's and AWQ's usual choice.
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [N, K], float32 scales [N]) with ``weight ~= q * scale[:, None]``: round to nearest, so each
    element is off by at most ``scale / 2``; an all-zero row gets scale 1 (and zeros)."""
    w = weight.detach().to(torch.float32)
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_per_channel(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight an int8 weight and its scales stand for."""
    return qweight.to(torch.float32) * scale[:, None]


def linear_w8_kernel(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The weight-only composite: int8 values exact in float32, summed in float32, rounded once."""
    y = torch.nn.functional.linear(x.to(torch.float32), qweight.to(torch.float32)) * scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


linear_w8 = torch.library.custom_op("xllm::linear_w8", linear_w8_kernel, mutates_args=())


@linear_w8.register_fake
def _(x, qweight, scale, bias=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def linear_w8_out_kernel(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
) -> None:
    out.copy_(linear_w8_kernel(x, qweight, scale, bias))


linear_w8_out = torch.library.custom_op("xllm::linear_w8_out", linear_w8_out_kernel, mutates_args=("out",))


def quantize_per_group(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 [N, ceil(K/2)] packed values, float32 scales [N, G], float32 offsets [N, G]), G = ceil(K /
    group_size), with ``weight ~= q * scale + offset`` per group (the last one shorter when group_size does
    not divide K): offset is the group's minimum, scale its range / 15 (1 for a constant group), q rounded
    to nearest, so each element is off by at most ``scale / 2``."""
    w = weight.detach().to(torch.float32)
    rows, k_size = w.shape
    groups = -(-k_size // group_size)
    pad = groups * group_size - k_size
    padded = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1) if pad else w  # repeats change no min or max
    grouped = padded.view(rows, groups, group_size)
    low, high = grouped.amin(dim=2), grouped.amax(dim=2)
    scale = torch.where(high > low, (high - low) / INT4_MAX, torch.ones_like(low))
    q = torch.round((grouped - low[..., None]) / scale[..., None]).clamp_(0, INT4_MAX).to(torch.uint8)
    return pack_int4(q.view(rows, -1)[:, :k_size]), scale, low


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 15] [N, K] as bytes [N, ceil(K/2)]: even k in the low nibble, odd k in the high
    one, a padding nibble (odd K) 0."""
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    pairs = q.view(q.shape[0], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_int4(qweight: torch.Tensor, k_size: int) -> torch.Tensor:
    """The uint8 values [N, k_size] in [0, 15] that ``pack_int4`` packed."""
    return torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).view(qweight.shape[0], -1)[:, :k_size]


def dequantize_per_group(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    k_size: int,
    group_size: int,
) -> torch.Tensor:
    """The float32 weight [N, k_size] an int4 weight, its scales and offsets (groups of ``group_size``) stand for."""
    expand = functools.partial(torch.repeat_interleave, repeats=group_size, dim=1)
    return unpack_int4(qweight, k_size).to(torch.float32) * expand(scale)[:, :k_size] + expand(offset)[:, :k_size]


def linear_w4_kernel(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weight-only composite: the weight dequantized to float32, summed in float32, rounded once."""
    weight = dequantize_per_group(qweight, scale, offset, x.shape[-1], group_size)
    y = torch.nn.functional.linear(x.to(torch.float32), weight)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


linear_w4 = torch.library.custom_op("xllm::linear_w4", linear_w4_kernel, mutates_args=())


@linear_w4.register_fake
def _(x, qweight, scale, offset, group_size, bias=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def linear_w4_out_kernel(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    out.copy_(linear_w4_kernel(x, qweight, scale, offset, group_size, bias))


linear_w4_out = torch.library.custom_op("xllm::linear_w4_out", linear_w4_out_kernel, mutates_args=("out",))
