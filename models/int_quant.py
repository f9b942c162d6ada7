"""GPTQ and AWQ checkpoints as published (packed int4/int8 weights, per-group scales and zero points):
linears converted to xllm::linear_w4's form (``read_int4``; 8 bits as two 4-bit planes), the others
dequantized to float32.

GPTQ (AutoGPTQ, GPTQModel, optimum; ``quant_method: gptq``) stores a linear ``X`` of N outputs, K inputs as

    X.qweight  int32 [K*bits/32, N]   bits-wide values packed along K, low bits first
    X.qzeros   int32 [G, N*bits/32]   zero points packed along N, low bits first
    X.scales   fp16  [G, N]
    X.g_idx    int32 [K]              the group of each input column (act-order: not monotonic)

with G = ceil(K / group_size) (1 for group_size -1) and weight[n, k] = (q[k, n] - zero[g, n]) * scale[g, n],
g = g_idx[k]. checkpoint_format 'gptq' (v1, the default) stores each zero minus one: AutoGPTQ's pack
subtracts 1 and its dequantization (and exllama's, vLLM's) adds it back; 'gptq_v2' stores it as is.

AWQ (AutoAWQ's GEMM layout; ``quant_method: awq``, ``version: gemm``) stores ``X.qweight`` int32 [K, N/8]
and ``X.qzeros`` int32 [G, N/8], 4-bit values packed along N with word nibble i holding column
``AWQ_ORDER[i]`` of its eight, and ``X.scales`` [G, N]; the group of input k is k // group_size.

Dequantizing in float32 is exact: q - zero is an integer of at most 9 bits and a 16-bit float scale has
at most 11 significant bits, so each product fits float32's 24; cast to float16 it is what a float16
dequantization computes (one rounding of the same exact product). The int4 form is exact for the same
reason: ``q * scale`` and ``offset = -zero * scale`` are exact products, and their sum is the exact value
``(q - zero) * scale``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from xllm_compiler.errors import CheckpointError
from xllm_compiler.ops.quant import GROUP_SIZES, pack_int4

PACKED_SUFFIX = ".qweight"
#: A packed linear's other tensors: ``X.qzeros``, ``X.scales`` and (GPTQ) ``X.g_idx``.
COMPANION_SUFFIXES = (".qzeros", ".scales", ".g_idx")
#: AWQ's interleaving: nibble i (from the low bits) of a packed word holds column AWQ_ORDER[i] of its 8.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: checkpoint_format -> what is added to a stored GPTQ zero point.
GPTQ_ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}
SCALE_DTYPES = ("F16", "BF16", "F32")
#: Elements of the weight dequantized at once: bounds each temporary to 16 MB, whatever N is.
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class IntQuant:
    """A GPTQ or AWQ checkpoint's packing, from config.json's quantization_config."""

    method: str
    """'gptq' or 'awq'."""
    bits: int
    group_size: int
    """Input columns per group; -1: one group per row."""
    zero_offset: int = 0
    """Added to every stored zero point (1 for GPTQ's v1 format)."""
    desc_act: bool = False
    """GPTQ act-order: groups follow g_idx, which must then be stored."""


def gptq_scheme(quant: dict[str, Any]) -> IntQuant:
    """The GPTQ packing ``quant`` declares; bit widths, formats and options we cannot load refused by name."""
    fmt = quant.get("checkpoint_format", quant.get("format", "gptq"))
    if fmt not in GPTQ_ZERO_OFFSETS:
        raise _unsupported("gptq", "checkpoint_format", fmt, tuple(GPTQ_ZERO_OFFSETS))
    if quant.get("dynamic"):
        raise CheckpointError("quantization_config dynamic (per-module overrides) is not supported for 'gptq'")
    _flag(quant, "sym", True, "gptq")  # symmetric or not, the zero points are stored
    return IntQuant(
        method="gptq",
        bits=_bits(quant, ("bits",), (4, 8), "gptq"),
        group_size=_group_size(quant, ("group_size",), "gptq"),
        zero_offset=GPTQ_ZERO_OFFSETS[fmt],
        desc_act=_flag(quant, "desc_act", False, "gptq"),
    )


def awq_scheme(quant: dict[str, Any]) -> IntQuant:
    """The AWQ packing ``quant`` declares (transformers' or AutoAWQ's key names); others refused by name."""
    version = quant.get("version", "gemm")
    if not isinstance(version, str) or version.lower() != "gemm":
        raise _unsupported("awq", "version", version, ("gemm",))
    backend = quant.get("backend", "autoawq")
    if backend != "autoawq":  # llm-awq packs its weights another way
        raise _unsupported("awq", "backend", backend, ("autoawq",))
    if not _flag(quant, "zero_point", True, "awq"):
        raise _unsupported("awq", "zero_point", False, (True,))
    return IntQuant(
        method="awq",
        bits=_bits(quant, ("bits", "w_bit"), (4,), "awq"),
        group_size=_group_size(quant, ("group_size", "q_group_size"), "awq"),
    )


def _unsupported(method: str, key: str, value: Any, supported: tuple[Any, ...]) -> CheckpointError:
    names = ", ".join(map(repr, supported))
    return CheckpointError(f"quantization_config {key} {value!r} is not supported for '{method}' (supported: {names})")


def _field(quant: dict[str, Any], keys: tuple[str, ...], method: str) -> Any:
    for key in keys:
        if key in quant:
            return quant[key]
    raise CheckpointError(f"quantization_config for '{method}' has no '{keys[0]}'")


def _bits(quant: dict[str, Any], keys: tuple[str, ...], supported: tuple[int, ...], method: str) -> int:
    bits = _field(quant, keys, method)
    if isinstance(bits, bool) or bits not in supported:
        raise _unsupported(method, keys[0], bits, supported)
    return bits


def _group_size(quant: dict[str, Any], keys: tuple[str, ...], method: str) -> int:
    size = _field(quant, keys, method)
    if isinstance(size, bool) or not isinstance(size, int) or not (size == -1 or size > 0):
        raise CheckpointError(f"quantization_config {keys[0]} must be a positive int or -1, got {size!r}")
    return size


def _flag(quant: dict[str, Any], key: str, default: bool, method: str) -> bool:
    value = quant.get(key, default)
    if not isinstance(value, bool):
        raise CheckpointError(f"quantization_config {key} must be true or false for '{method}', got {value!r}")
    return value


def packed_name(weight_name: str) -> str | None:
    """``X.qweight`` for ``X.weight``; None for a name that is no weight."""
    if not weight_name.endswith(".weight"):
        return None
    return weight_name.removesuffix(".weight") + PACKED_SUFFIX


def owner_of(companion: str) -> str | None:
    """The ``X.qweight`` that ``X.qzeros``, ``X.scales`` or ``X.g_idx`` belong to; None for other names."""
    for suffix in COMPANION_SUFFIXES:
        if companion.endswith(suffix):
            return companion.removesuffix(suffix) + PACKED_SUFFIX
    return None


def weight_name(packed: str) -> str:
    """``X.weight``, the name the model knows ``X.qweight`` by."""
    return packed.removesuffix(PACKED_SUFFIX) + ".weight"


def unpack(packed: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 values of ``packed``'s ``bits``-wide fields along ``dim`` (0 or 1): value j of word w is
    value w * 32/bits + j, held in field ``order[j]`` counted from the low bits (default: field j)."""
    per = 32 // bits
    shifts = bits * torch.tensor(order or range(per), dtype=torch.int32)
    mask = (1 << bits) - 1
    rows, cols = packed.shape
    if dim == 0:
        return ((packed[:, None, :] >> shifts[None, :, None]) & mask).reshape(rows * per, cols)
    return ((packed[:, :, None] >> shifts) & mask).reshape(rows, cols * per)


#: The field of AWQ's word holding each of its 8 columns: the inverse of AWQ_ORDER.
AWQ_FIELDS = tuple(AWQ_ORDER.index(j) for j in range(8))


@dataclass(frozen=True)
class _Stored:
    """A packed linear's tensors as stored, checked against each other and the weight's shape."""

    qweight: torch.Tensor
    zeros: torch.Tensor
    """int64 [G, N], the format's zero offset added."""
    scales: torch.Tensor
    """float32 [G, N]."""
    g_idx: torch.Tensor
    """int64 [K]: the group of each input (k // group without act-order)."""
    group: int
    """Inputs per group (K for group_size -1)."""


def _read_stored(
    scheme: IntQuant, packed: str, shape: tuple[int, ...], stored: Callable[[str], tuple[str, Any] | None]
) -> _Stored:
    """The tensors of packed linear ``packed`` (``X.qweight``), read through ``stored`` (name -> (file
    name, safetensors slice), None when absent); CheckpointError names the first that does not fit."""
    prefix = packed.removesuffix(PACKED_SUFFIX)
    label = f"{scheme.bits}-bit {scheme.method.upper()}"
    found = stored(packed)
    if found is None:
        raise CheckpointError(f"tensor '{packed}' is missing from the checkpoint")
    where = found[0]
    if len(shape) != 2:
        raise CheckpointError(
            f"{where}: tensor '{packed}' is {label} but '{prefix}.weight' is {list(shape)}, not a matrix"
        )
    n, k = shape
    pack = 32 // scheme.bits
    gptq = scheme.method == "gptq"
    packed_dim, packed_size = ("K", k) if gptq else ("N", n)
    if packed_size % pack:
        raise CheckpointError(
            f"{where}: tensor '{packed}' is {label} but '{prefix}.weight' {list(shape)} has {packed_dim} = "
            f"{packed_size}, not a multiple of {pack}"
        )
    group = k if scheme.group_size == -1 else scheme.group_size
    groups = math.ceil(k / group)
    expected: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {
        PACKED_SUFFIX: ((k // pack, n) if gptq else (k, n // pack), ("I32",)),
        ".qzeros": ((groups, n // pack), ("I32",)),
        ".scales": ((groups, n), SCALE_DTYPES),
    }
    if gptq:
        expected[".g_idx"] = ((k,), ("I32", "I64"))
    tensors: dict[str, torch.Tensor] = {}
    files: dict[str, str] = {}
    for suffix, (want, dtypes) in expected.items():
        name = prefix + suffix
        found = stored(name)
        if found is None:
            if suffix == ".g_idx" and not scheme.desc_act:
                continue  # without act-order, input k is in group k // group_size (vLLM's default too)
            raise CheckpointError(f"{where}: tensor '{packed}' is {label} but its '{name}' is missing")
        file, view = found
        if tuple(view.get_shape()) != want:
            raise CheckpointError(
                f"{file}: tensor '{name}' has shape {list(view.get_shape())}, expected {list(want)} "
                f"({label}, group size {scheme.group_size}, '{prefix}.weight' {list(shape)})"
            )
        if view.get_dtype() not in dtypes:
            raise CheckpointError(
                f"{file}: tensor '{name}' has dtype {view.get_dtype()}, expected {' or '.join(dtypes)}"
            )
        tensors[suffix], files[suffix] = view[:], file
    g_idx = tensors[".g_idx"].long() if ".g_idx" in tensors else torch.arange(k) // group
    if ".g_idx" in tensors and (g_idx.min() < 0 or g_idx.max() >= groups):
        bad = g_idx[(g_idx < 0) | (g_idx >= groups)][0].item()
        raise CheckpointError(
            f"{files['.g_idx']}: tensor '{prefix}.g_idx' holds group {bad}, outside [0, {groups}) "
            f"(group size {scheme.group_size}, '{prefix}.weight' {list(shape)})"
        )
    qzeros = tensors[".qzeros"]
    zeros = unpack(qzeros, scheme.bits, 1) + scheme.zero_offset if gptq else unpack(qzeros, 4, 1, AWQ_FIELDS)
    return _Stored(tensors[PACKED_SUFFIX], zeros.long(), tensors[".scales"].float(), g_idx, group)


def read_dequantized(
    scheme: IntQuant,
    packed: str,
    shape: tuple[int, ...],
    stored: Callable[[str], tuple[str, Any] | None],
) -> torch.Tensor:
    """The float32 weight [N, K] of packed linear ``packed`` (``X.qweight``), its tensors read through
    ``stored`` (name -> (file name, safetensors slice), None when absent) and checked against ``shape``.
    The whole tensor is read: a tensor-parallel shard is cut from it by the caller."""
    parts = _read_stored(scheme, packed, shape, stored)
    return _dequantize(scheme, parts.qweight, parts.zeros, parts.scales, parts.g_idx, parts.group)


@dataclass(frozen=True)
class Int4Weight:
    """A 4- or 8-bit linear of a checkpoint in ``xllm::linear_w4``'s form (ops/quant.py), converted exactly:
    ``(q - zero) * scale = q * scale + offset`` with ``offset = -zero * scale`` (8 bits: two planes of 4,
    see ``read_int4``). With act-order the inputs are sorted by group, so that each group is a run of
    consecutive inputs again, and ``input_order`` says which input of the layer each kernel input is:
    ``y = x[..., input_order] @ W.T``."""

    qweight: torch.Tensor
    """uint8 [N, ceil(K'/2)], two values a byte (ops/quant.py's pack_int4); K' the kernel's inputs: K, or 2K
    for an 8-bit weight's two planes."""
    scale: torch.Tensor
    """float32 [N, G]."""
    offset: torch.Tensor
    """float32 [N, G]."""
    group_size: int
    input_order: torch.Tensor | None
    """int64 [K], or None when the groups were consecutive already."""

    def rows(self, start: int, end: int) -> Int4Weight:
        """Outputs [start, end): a column-parallel shard."""
        return self.map_rows(lambda tensor: tensor[start:end].contiguous())

    def map_rows(self, reorder: Callable[[torch.Tensor], torch.Tensor]) -> Int4Weight:
        """The same weight with its output rows moved by ``reorder`` (applied to every per-row tensor)."""
        return dataclasses.replace(
            self, qweight=reorder(self.qweight), scale=reorder(self.scale), offset=reorder(self.offset)
        )

    def inputs(self, start: int, end: int, k_size: int) -> Int4Weight | None:
        """Inputs [start, end) of ``k_size``: a row-parallel shard; None where that slice splits a group,
        or act-order (or an 8-bit weight's two planes) scattered the slice's inputs over the kernel's."""
        if self.input_order is not None or start % self.group_size or (end % self.group_size and end != k_size):
            return None
        first, last = start // self.group_size, -(-end // self.group_size)
        return dataclasses.replace(
            self,
            qweight=self.qweight[:, start // 2 : -(-end // 2)].contiguous(),
            scale=self.scale[:, first:last].contiguous(),
            offset=self.offset[:, first:last].contiguous(),
        )


def read_int4(
    scheme: IntQuant,
    packed: str,
    shape: tuple[int, ...],
    stored: Callable[[str], tuple[str, Any] | None],
) -> Int4Weight | None:
    """Packed linear ``packed`` (``X.qweight``) as an Int4Weight, or None where it loads dequantized: act-order
    groups of unequal sizes, a group that is not one of GROUP_SIZES, or (8 bits) groups that do not tile K.
    The CPU kernel rounds each group of its inputs to int8 with one scale (ops/cpu_int4.cpp): at 32 to 128
    inputs that is measured (tests/quant); over a whole row of thousands, one outlier would set the step of
    every input of the row. So a checkpoint with one group a row (group_size -1), whose zero and scale are
    the same all along the row, is cut into the largest of GROUP_SIZES that divides K: the same values.

    8 bits are two 4-bit planes: ``q = 16 hi + lo``, so ``(q - zero) * scale = hi * 16 scale - zero * scale +
    lo * scale``, each term exact in float32 as above. The planes are laid side by side along K (the high
    one first), with scales (16 scale, scale) and offsets (-zero * scale, 0), and the layer's input is read
    twice (``input_order`` lists every input for each plane): one linear_w4 of 2K inputs on 8 bits a weight,
    the checkpoint's own integers, no second kernel."""
    k = shape[1]
    group = scheme.group_size if scheme.group_size != -1 else _row_group(k)
    if group not in GROUP_SIZES or (scheme.bits == 8 and k % group):
        return None
    parts = _read_stored(scheme, packed, shape, stored)
    fields = (0,) if scheme.method == "gptq" else (1, AWQ_FIELDS)  # GPTQ packs along K, AWQ along N
    q = unpack(parts.qweight, scheme.bits, *fields).t()  # [N, K]
    order, consecutive = None, torch.arange(k) // parts.group
    if not torch.equal(parts.g_idx, consecutive):
        order = torch.argsort(parts.g_idx, stable=True)
        if not torch.equal(parts.g_idx[order], consecutive):
            return None  # groups of unequal sizes: no run of consecutive inputs holds each
        q = q[:, order]
    pieces = parts.group // group  # the stored groups, cut into kernel groups (more than one: a row's group)
    zeros = parts.zeros.t().float().repeat_interleave(pieces, dim=1)  # [N, G]
    scales = parts.scales.t().repeat_interleave(pieces, dim=1).contiguous()
    offsets = -(zeros * scales)
    if scheme.bits == 4:
        return Int4Weight(pack_int4(q.to(torch.uint8).contiguous()), scales, offsets, group, order)
    planes = torch.cat([q >> 4, q & 0x0F], dim=1).to(torch.uint8).contiguous()
    inputs = torch.arange(k) if order is None else order
    return Int4Weight(
        pack_int4(planes),
        torch.cat([scales * 16, scales], dim=1),
        torch.cat([offsets, torch.zeros_like(offsets)], dim=1),
        group,
        torch.cat([inputs, inputs]),
    )


def _row_group(k_size: int) -> int | None:
    """The largest of GROUP_SIZES that divides ``k_size`` (None: none does)."""
    return next((size for size in sorted(GROUP_SIZES, reverse=True) if k_size % size == 0), None)


def _dequantize(
    scheme: IntQuant, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, group: int
) -> torch.Tensor:
    """weight[n, k] = (q[n, k] - zeros[g_idx[k], n]) * scales[g_idx[k], n], unpacked straight into the
    [N, K] layout a few output rows at a time. Groups of consecutive inputs (no act-order) broadcast their
    zero and scale; act-order gathers them per input."""
    (groups, n), k = zeros.shape, g_idx.numel()
    pack = 32 // scheme.bits
    packed = qweight.t().contiguous()  # GPTQ: [N, K/pack], packed along K; AWQ: [N/8, K], packed along N
    zeros, scales = zeros.t().float(), scales.t().contiguous()  # [N, G]
    consecutive = k == groups * group and torch.equal(g_idx, torch.arange(k) // group)
    rows = max(pack, CHUNK_ELEMENTS // k // pack * pack)
    out = torch.empty(n, k, dtype=torch.float32)
    for start in range(0, n, rows):
        end = min(start + rows, n)
        values = out[start:end]
        if scheme.method == "gptq":
            values.copy_(unpack(packed[start:end], scheme.bits, dim=1))
        else:
            values.copy_(unpack(packed[start // pack : end // pack], 4, 0, AWQ_FIELDS))
        if consecutive:
            grouped = values.view(end - start, groups, group)
            grouped.sub_(zeros[start:end, :, None]).mul_(scales[start:end, :, None])
        else:
            values.sub_(zeros[start:end, g_idx]).mul_(scales[start:end, g_idx])
    return out
