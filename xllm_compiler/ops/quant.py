"""``xllm::linear_w8``: a linear layer on int8 weights, symmetric per output channel, with float scales.

``y = x @ (qweight * scale[:, None]).T + bias``: ``qweight [N, K]`` int8 in [-127, 127], ``scale [N]``
float32, ``bias [N]`` in x's dtype or None; ``y`` has x's dtype. What the op means is that weight-only
arithmetic, and the composite here computes exactly it (float32 sums): the oracle of the tests and what
every device without a kernel of its own runs. The CPU kernel (ops/cpu_quant.cpp) also quantizes each
input row to int8 on the fly, so its results differ from the composite by that rounding (bounded in
tests/quant). ``quantize_per_channel`` is the one quantizer: the compile pass and the tests call it.

Why per output channel and symmetric: one float scale per row of the weight keeps the int8 dot products
free of zero-point corrections, and the scale folds into the output once per column.
"""

from __future__ import annotations

import torch

#: Largest magnitude of a quantized value: symmetric, so -128 is never used and -q is always representable.
INT8_MAX = 127


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
