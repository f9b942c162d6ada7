"""FP8 block-quantized checkpoints, as DeepSeek publishes them: dequantized to the compile dtype on load.

A quantized tensor ``X.weight`` [..., N, K] is stored as float8_e4m3fn next to ``X.weight_scale_inv``
float32 [..., ceil(N/bn), ceil(K/bk)], one scale per bn x bk block (the last block of a dim may be
partial); the weight is ``fp8.float() * scale`` over each block. config.json says so in
``quantization_config`` = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [bn, bk]}. Dequantizing in float32 is exact (an e4m3 value has 4 significant bits, so
each product rounds once), which is what makes an fp8 checkpoint compile to the same artifact as its
dequantized copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from xllm_compiler.errors import CheckpointError

#: The suffix of a quantized tensor's scale companion: ``X.weight`` -> ``X.weight_scale_inv``.
SCALE_SUFFIX = "_scale_inv"
#: safetensors' name of float8_e4m3fn; any other ``F8_`` dtype is refused.
E4M3 = "F8_E4M3"


@dataclass(frozen=True)
class Fp8Blocks:
    """The block size of an fp8 checkpoint's scales: rows x columns of the last two dims."""

    block: tuple[int, int]


def fp8_blocks(quant: dict[str, Any]) -> Fp8Blocks:
    """The block size of a ``quant_method: fp8`` quantization_config; other formats and activation
    schemes refused by name."""
    if quant.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"quantization_config fmt {quant['fmt']!r} is not supported (supported: 'e4m3')")
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        raise CheckpointError(
            f"quantization_config activation_scheme {quant['activation_scheme']!r} is not supported "
            "(supported: 'dynamic')"
        )
    block = quant.get("weight_block_size")
    if not (
        isinstance(block, list | tuple)
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise CheckpointError(f"quantization_config weight_block_size must be a pair of positive ints, got {block!r}")
    return Fp8Blocks(block=(block[0], block[1]))


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The shape of the scales of a weight of ``shape``: one per block of the last two dims."""
    *lead, n, k = shape
    return (*lead, math.ceil(n / block[0]), math.ceil(k / block[1]))


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 ``weight`` [..., N, K] from its fp8 values and per-block scales, scaled in place in one
    float32 buffer viewed as blocks (partial last blocks padded, then cut off). Broadcasting the scales
    to the weight's shape gives the same products but takes three buffers and a third more time."""
    *lead, n, k = weight.shape
    (bn, bk), (nb, kb) = block, scale_inv.shape[-2:]
    if n % bn or k % bk:
        out = torch.zeros(*lead, nb * bn, kb * bk, dtype=torch.float32)
    else:
        out = torch.empty(*lead, n, k, dtype=torch.float32)
    out[..., :n, :k] = weight
    out.view(*lead, nb, bn, kb, bk).mul_(scale_inv.float()[..., :, None, :, None])
    return out[..., :n, :k].contiguous()


def read_dequantized(
    weight_view: Any,
    scale_view: Any,
    shape: tuple[int, ...],
    block: tuple[int, int],
    shard: tuple[int, int, int] | None,
) -> torch.Tensor:
    """The float32 weight (or its ``shard`` = (dim, start, end) slice) from safetensors slice views of the
    fp8 values and their scales. A slice that starts and ends on block boundaries (or at the end of the
    dim) reads only its rows/columns and their scales; any other is read whole, dequantized and sliced,
    since its first and last blocks straddle the slice's edges."""
    if shard is None:
        return dequantize(weight_view[:], scale_view[:], block)
    dim, start, end = shard
    dim = dim % len(shape)
    index = (slice(None),) * dim + (slice(start, end),)
    leading = len(shape) - 2
    if dim < leading:  # an expert dim: every expert has its own scales
        return dequantize(weight_view[index], scale_view[index], block)
    size = block[dim - leading]
    if start % size == 0 and (end % size == 0 or end == shape[dim]):
        scales = (slice(None),) * dim + (slice(start // size, math.ceil(end / size)),)
        return dequantize(weight_view[index], scale_view[scales], block)
    return dequantize(weight_view[:], scale_view[:], block)[index].contiguous()
