"""Rotary embedding tables: inverse frequencies for the default, linear, llama3 and yarn rope types.

cos/sin are precomputed once per position, in float32 the way transformers computes them on the fly
(positions * inv_freq, duplicated over both halves, times yarn's attention factor), then cast to the model
dtype; the graph only gathers rows of the table by position. Every step follows transformers' order of
operations, so the tables are bit-identical to its rotary embedding's.
"""

from __future__ import annotations

import math

import torch

from xllm_compiler.models.config import RopeSpec


def inverse_frequencies(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """inv_freq [head_dim / 2] in float32, with the rope type's scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / head_dim
    wavelengths = rope.theta**exponents
    inv_freq = 1.0 / wavelengths
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        return _llama3_scaling(inv_freq, rope)
    if rope.kind == "yarn":
        return _yarn_scaling(inv_freq, wavelengths, rope, head_dim)
    return inv_freq


def _llama3_scaling(inv_freq: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by ``factor``, short ones kept, the band between interpolated."""
    old_context = rope.original_max_position_embeddings
    low_freq_wavelen = old_context / rope.low_freq_factor
    high_freq_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def _correction_dim(rotations: float, dim: int, rope: RopeSpec) -> float:
    """The dimension whose wavelength makes ``rotations`` turns over the original context."""
    context = rope.original_max_position_embeddings
    return (dim * math.log(context / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))


def _yarn_scaling(inv_freq: torch.Tensor, wavelengths: torch.Tensor, rope: RopeSpec, dim: int) -> torch.Tensor:
    """YaRN: dimensions that turn more than ``beta_fast`` times over the original context keep their
    frequency (extrapolation), those under ``beta_slow`` turns are divided by ``factor`` (interpolation),
    and a linear ramp blends the band between."""
    low = _correction_dim(rope.beta_fast, dim, rope)
    high = _correction_dim(rope.beta_slow, dim, rope)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    interpolated = 1.0 / (rope.factor * wavelengths)
    return interpolated * (1 - extrapolation) + inv_freq * extrapolation


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context stretched by ``factor`` (1 when not stretched)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def attention_factor(rope: RopeSpec) -> float:
    """The factor cos and sin are multiplied by: yarn's ``attention_factor``, given or derived (the ratio of
    the two mscales when both are set, as DeepSeek's configs do, which makes it 1); 1 for other types."""
    if rope.kind != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.mscale and rope.mscale_all_dim:
        return float(yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim))
    return yarn_mscale(rope.factor)


def softmax_scale(rope: RopeSpec, qk_head_dim: int) -> float:
    """DeepSeek's attention softmax scale: 1/sqrt(qk_head_dim), times yarn_mscale(factor, mscale_all_dim)
    squared for a scaled rope with ``mscale_all_dim`` set (the logit growth its rope table does not undo)."""
    scale = qk_head_dim ** (-0.5)
    if rope.kind != "default" and rope.mscale_all_dim:
        mscale = yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale = scale * mscale * mscale  # transformers' order: not scale * mscale**2, which can round differently
    return scale


def cos_sin_tables(
    rope: RopeSpec, head_dim: int, num_positions: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [num_positions, head_dim] in ``dtype``, scaled by the attention factor in float32."""
    positions = torch.arange(num_positions, dtype=torch.int64, device="cpu").float()
    freqs = positions[:, None] * inverse_frequencies(rope, head_dim)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = attention_factor(rope)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
