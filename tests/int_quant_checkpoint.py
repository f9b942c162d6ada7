"""Write GPTQ and AWQ checkpoints from tiny plain ones, for tests, following the formats' published packing.

Written from AutoGPTQ's ``QuantLinear.pack`` and AutoAWQ's ``WQLinear_GEMM.from_linear``, with loops over
the packed words as they have them, independently of models/int_quant.py. Each group of each output row
is quantized to integers with an integer zero point and a float16 scale; the weights the checkpoint means
are ``(q - zero) * scale`` computed from those integers before packing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.fp8_checkpoint import checkpoint_tensors, save_quantized

#: The linears GPTQ and AWQ quantize in a Llama-style decoder; embeddings, norms and the head stay float.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: AutoAWQ's order_map: nibble i of a packed word holds column AWQ_PACK_ORDER[i] of its eight.
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words of 32 bits as the int32 tensor holding the same bits (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def quantize_groups(
    weight: torch.Tensor, bits: int, g_idx: torch.Tensor, sym: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [N, K] int64, zeros [G, N] int64, scales [G, N] float16) of ``weight`` [N, K], the input columns
    grouped by ``g_idx``: GPTQ's quantizer (sym: zero (maxq + 1) / 2, scale 2 max|w| / maxq), AWQ's with
    sym False (scale (max - min) / maxq, zero -round(min / scale))."""
    maxq = 2**bits - 1
    n, k = weight.shape
    groups = int(g_idx.max()) + 1
    q = torch.zeros(n, k, dtype=torch.int64)
    zeros = torch.zeros(groups, n, dtype=torch.int64)
    scales = torch.zeros(groups, n, dtype=torch.float16)
    for g in range(groups):
        cols = (g_idx == g).nonzero().squeeze(1)
        w = weight[:, cols].double()
        if sym:
            scale = (2 * w.abs().amax(1) / maxq).clamp_min(1e-4).half()
            zero = torch.full((n,), (maxq + 1) // 2, dtype=torch.int64)
        else:
            low, high = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
            scale = ((high - low) / maxq).clamp_min(1e-4).half()
            zero = torch.round(-low / scale.double()).clamp(0, maxq).long()
        q[:, cols] = (torch.round(w / scale.double()[:, None]) + zero[:, None]).clamp(0, maxq).long()
        zeros[g], scales[g] = zero, scale
    return q, zeros, scales


def meant_weight(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """float32 [N, K]: column k is (q[:, k] - zero[g_idx[k]]) * scale[g_idx[k]]."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for k in range(q.shape[1]):
        g = int(g_idx[k])
        out[:, k] = (q[:, k] - zeros[g]).float() * scales[g].float()
    return out


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R / (32/bits), C]: word r of a column holds values r*per .. r*per + per - 1, low bits first."""
    per = 32 // bits
    words = torch.zeros(values.shape[0] // per, values.shape[1], dtype=torch.int64)
    for row in range(words.shape[0]):
        for j in range(per):
            words[row] |= values[row * per + j] << (bits * j)
    return as_int32(words)


def pack_columns(values: torch.Tensor, bits: int, order: list[int] | None = None) -> torch.Tensor:
    """int32 [R, C / (32/bits)]: field j of word c holds column c*per + order[j] (order: 0, 1, ...)."""
    per = 32 // bits
    order = order or list(range(per))
    words = torch.zeros(values.shape[0], values.shape[1] // per, dtype=torch.int64)
    for col in range(words.shape[1]):
        for j in range(per):
            words[:, col] |= values[:, col * per + order[j]] << (bits * j)
    return as_int32(words)


def gptq_tensors(
    weight: torch.Tensor, bits: int, group_size: int, act_order: bool, sym: bool = True, v2: bool = False, seed=0
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({suffix: tensor} of a GPTQ linear, the float32 weight it means). Act-order groups the columns in a
    random permutation's order (GPTQ sorts by the Hessian's diagonal): g_idx[perm[i]] = i // group_size."""
    k = weight.shape[1]
    group = k if group_size == -1 else group_size
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed)) if act_order else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[order] = torch.arange(k) // group
    q, zeros, scales = quantize_groups(weight, bits, g_idx, sym)
    stored_zeros = zeros if v2 else zeros - 1  # GPTQ's v1 format stores zero - 1
    tensors = {
        ".qweight": pack_rows(q.t().contiguous(), bits),
        ".qzeros": pack_columns(stored_zeros, bits),
        ".scales": scales,
        ".g_idx": g_idx.to(torch.int32),
    }
    return tensors, meant_weight(q, zeros, scales, g_idx)


def awq_tensors(weight: torch.Tensor, group_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({suffix: tensor} of an AWQ GEMM linear (4 bits, zero points), the float32 weight it means)."""
    k = weight.shape[1]
    g_idx = torch.arange(k) // (k if group_size == -1 else group_size)
    q, zeros, scales = quantize_groups(weight, 4, g_idx, sym=False)
    tensors = {
        ".qweight": pack_columns(q.t().contiguous(), 4, AWQ_PACK_ORDER),
        ".qzeros": pack_columns(zeros, 4, AWQ_PACK_ORDER),
        ".scales": scales,
    }
    return tensors, meant_weight(q, zeros, scales, g_idx)


def gptq_config(bits: int, group_size: int, act_order: bool, sym: bool = True, v2: bool = False) -> dict:
    """config.json's quantization_config as AutoGPTQ / GPTQModel write it."""
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": act_order,
        "sym": sym,
        "damp_percent": 0.01,
        "true_sequential": True,
        "static_groups": False,
        "checkpoint_format": "gptq_v2" if v2 else "gptq",
    }


def awq_config(group_size: int, modules_to_not_convert: list[str] | None = None) -> dict:
    """config.json's quantization_config as transformers writes it for an AutoAWQ GEMM checkpoint."""
    return {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": modules_to_not_convert,
    }


def quantize_checkpoint(src_dir: Path, dst_dir: Path, quant: dict, skip: tuple[str, ...] = ()) -> dict:
    """Copy the checkpoint in ``src_dir`` to ``dst_dir`` with every projection (but those whose name holds
    one of ``skip``) packed as ``quant`` (gptq_config / awq_config) says; returns the state dict the
    quantized checkpoint means (packed linears dequantized in float32, cast to their dtype)."""
    stored, meant = {}, {}
    for name, tensor in checkpoint_tensors(src_dir).items():
        prefix = name.removesuffix(".weight")
        if not (name.endswith(".weight") and prefix.endswith(PROJECTIONS)) or any(s in name for s in skip):
            stored[name] = meant[name] = tensor
            continue
        if quant["quant_method"] == "gptq":
            v2 = quant["checkpoint_format"] == "gptq_v2"
            packed, weight = gptq_tensors(
                tensor, quant["bits"], quant["group_size"], quant["desc_act"], quant["sym"], v2
            )
        else:
            packed, weight = awq_tensors(tensor, quant["group_size"])
        stored.update({prefix + suffix: value for suffix, value in packed.items()})
        meant[name] = weight.to(tensor.dtype)
    save_quantized(src_dir, dst_dir, stored, quant)
    return meant
