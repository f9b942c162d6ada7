"""Checkpoint weights from safetensors: single file or sharded, memory-mapped, cast on load.

Every failure names the file and tensor at fault, and for a wrong shape both the expected and the
found shape: a checkpoint that does not fit its config.json must never load half-way. MoE experts load
from either of their two layouts into one stacked tensor each (``load_experts``). FP8 block-quantized
tensors (models/fp8.py) and GPTQ / AWQ packed linears (models/int_quant.py) load dequantized, so no
caller sees their scales, zero points or packing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from xllm_compiler.errors import CheckpointError
from xllm_compiler.models import fp8, int_quant
from xllm_compiler.models.config import MoESpec
from xllm_compiler.models.quantization import Quantization

INDEX_FILE = "model.safetensors.index.json"


def _shard_of_each_tensor(model_dir: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from None
        shards = {name: model_dir / file for name, file in weight_map.items()}
        for shard in sorted(set(shards.values())):
            if not shard.is_file():
                raise CheckpointError(f"{shard} is listed in {INDEX_FILE} but does not exist")
        return shards
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {model_dir}")
    shards = {}
    with ExitStack() as stack:
        for file in files:
            for name in _open(file, stack).keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                shards[name] = file
    return shards


def _open(path: Path, stack: ExitStack):
    try:
        return stack.enter_context(safe_open(str(path), framework="pt"))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None


class Checkpoint:
    """Read access to a checkpoint's tensors by name, each file opened (mmap) once. ``quantization`` is
    what config.json declares (``quantization.checkpoint_quantization``): with fp8 blocks, float8 tensors
    load dequantized and their ``_scale_inv`` companions are hidden from ``names()`` and ``in``; with GPTQ
    or AWQ, a packed ``X.qweight`` loads as the float ``X.weight`` and its companions are hidden."""

    def __init__(self, model_dir: Path, quantization: Quantization | None = None):
        self.model_dir = Path(model_dir)
        self.quantization = quantization
        self._shards = _shard_of_each_tensor(self.model_dir)
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def names(self) -> Iterator[str]:
        """The model's tensor names: every stored tensor but the companions of quantized ones, a packed
        ``X.qweight`` named as the ``X.weight`` it loads as."""
        for name in self._shards:
            if not self._is_companion(name):
                yield int_quant.weight_name(name) if name.endswith(int_quant.PACKED_SUFFIX) else name

    def files(self) -> list[Path]:
        return sorted(set(self._shards.values()))

    def __contains__(self, name: str) -> bool:
        if name in self._shards:
            return not self._is_companion(name) and not name.endswith(int_quant.PACKED_SUFFIX)
        return int_quant.packed_name(name) in self._shards

    def _is_companion(self, name: str) -> bool:
        """An fp8 tensor's scale, or a packed linear's zero points, scales or group indices."""
        suffix = fp8.SCALE_SUFFIX
        if name.endswith(suffix) and name.removesuffix(suffix) in self._shards:
            return True
        return int_quant.owner_of(name) in self._shards

    def _stored(self, name: str) -> tuple[str, Any] | None:
        """(file name, safetensors slice) of a stored tensor; None if the checkpoint has no such tensor."""
        if name not in self._shards:
            return None
        path, handle = self._handle(name)
        return path.name, handle.get_slice(name)

    def _handle(self, name: str):
        """(file, open safetensors handle) of a stored tensor."""
        path = self._shards[name]
        return path, self._handles.get(path) or self._handles.setdefault(path, _open(path, self._stack))

    def load(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, shard: tuple[int, int, int] | None = None
    ) -> torch.Tensor:
        """Tensor ``name`` checked against ``shape`` (the whole tensor's) and cast to ``dtype``; with
        ``shard`` = (dim, start, end) only that slice is read from the file. An fp8 tensor is dequantized
        in float32 first; its shard reads only its own blocks when the slice is block-aligned, else the
        whole tensor (see ``fp8.read_dequantized``). A GPTQ / AWQ packed linear is dequantized whole, then
        its shard is cut (see ``int_quant.read_dequantized``)."""
        packed = int_quant.packed_name(name)
        if name not in self._shards and packed in self._shards:
            return self._unpacked(packed, shape, shard).to(dtype)
        if name not in self._shards:
            files = ", ".join(p.name for p in self.files())
            raise CheckpointError(f"tensor '{name}' is missing from the checkpoint (searched {files})")
        path, handle = self._handle(name)
        try:
            view = handle.get_slice(name)
            found = tuple(view.get_shape())
            if found != tuple(shape):
                raise CheckpointError(f"{path.name}: tensor '{name}' has shape {list(found)}, expected {list(shape)}")
            if view.get_dtype().startswith("F8_"):
                return self._dequantized(name, path, view, found, shard).to(dtype)
            if fp8.scale_name(name) in self._shards:
                raise CheckpointError(
                    f"{path.name}: tensor '{name}' has a scale '{fp8.scale_name(name)}' but is stored as "
                    f"{view.get_dtype()}, not float8_e4m3fn"
                )
            if shard is None:
                tensor = handle.get_tensor(name)
            else:
                dim, start, end = shard
                index = (slice(None),) * dim + (slice(start, end),)
                tensor = view[index]
        except SafetensorError as exc:
            raise CheckpointError(f"{path.name}: tensor '{name}' cannot be read ({exc})") from None
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path.name}: tensor '{name}' has dtype {tensor.dtype}, expected floats")
        return tensor.to(dtype)

    def load_int4(
        self, name: str, shape: tuple[int, ...], shard: tuple[int, int, int] | None = None
    ) -> int_quant.Int4Weight | None:
        """Linear weight ``name`` (the whole tensor's ``shape``; ``shard`` as for ``load``) in linear_w4's
        form, when the checkpoint stores it as a 4-bit GPTQ / AWQ linear that form holds exactly
        (``int_quant.read_int4``); None otherwise, and then ``load`` gives its float values."""
        packed = int_quant.packed_name(name)
        if name in self._shards or packed not in self._shards or not isinstance(self.quantization, int_quant.IntQuant):
            return None
        try:
            weight = int_quant.read_int4(self.quantization, packed, shape, self._stored)
        except SafetensorError as exc:
            raise CheckpointError(f"{self._shards[packed].name}: tensor '{packed}' cannot be read ({exc})") from None
        if weight is None or shard is None:
            return weight
        dim, start, end = shard
        return weight.rows(start, end) if dim == 0 else weight.inputs(start, end, shape[1])

    def _unpacked(self, packed: str, shape: tuple[int, ...], shard) -> torch.Tensor:
        """The float32 weight of packed linear ``packed`` (or its shard), from ``X.qweight`` and companions."""
        path = self._shards[packed]
        if not isinstance(self.quantization, int_quant.IntQuant):
            raise CheckpointError(
                f"{path.name}: tensor '{packed}' holds packed integers but config.json has no quantization_config "
                "with quant_method 'gptq' or 'awq'"
            )
        try:
            tensor = int_quant.read_dequantized(self.quantization, packed, shape, self._stored)
        except SafetensorError as exc:
            raise CheckpointError(f"{path.name}: tensor '{packed}' cannot be read ({exc})") from None
        if shard is None:
            return tensor
        dim, start, end = shard
        return tensor[(slice(None),) * dim + (slice(start, end),)].contiguous()

    def _dequantized(self, name: str, path: Path, view, shape: tuple[int, ...], shard) -> torch.Tensor:
        """The float32 values of fp8 tensor ``name``, after checking its format and its scales."""
        if view.get_dtype() != fp8.E4M3:
            raise CheckpointError(
                f"{path.name}: tensor '{name}' has dtype {view.get_dtype()}; only float8_e4m3fn fp8 is supported"
            )
        if len(shape) < 2:
            raise CheckpointError(f"{path.name}: tensor '{name}' is float8_e4m3fn but not a matrix: {list(shape)}")
        if self.quantization is None:
            raise CheckpointError(
                f"{path.name}: tensor '{name}' is float8_e4m3fn but config.json has no quantization_config "
                "with quant_method 'fp8'"
            )
        scale = fp8.scale_name(name)
        if scale not in self._shards:
            raise CheckpointError(f"{path.name}: tensor '{name}' is float8_e4m3fn but its scale '{scale}' is missing")
        scale_path, handle = self._handle(scale)
        scale_view = handle.get_slice(scale)
        block = self.quantization.block
        expected, found = fp8.scale_shape(shape, block), tuple(scale_view.get_shape())
        if found != expected:
            raise CheckpointError(
                f"{scale_path.name}: tensor '{scale}' has shape {list(found)}, expected {list(expected)} "
                f"(one scale per {block[0]}x{block[1]} block of '{name}' {list(shape)})"
            )
        if scale_view.get_dtype() not in ("F32", "BF16", "F16"):
            raise CheckpointError(
                f"{scale_path.name}: tensor '{scale}' has dtype {scale_view.get_dtype()}, expected floats"
            )
        return fp8.read_dequantized(view, scale_view, shape, block, shard)


def load_experts(
    checkpoint: Checkpoint,
    name: str,
    moe: MoESpec,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    span: tuple[int, int] | None = None,
    experts: Sequence[int] | None = None,
) -> torch.Tensor:
    """A stacked expert tensor ``<block>.experts.gate_up_proj`` [E, 2I, H] or ``.down_proj`` [E, H, I],
    read from either layout: the same fused 3-D tensor, or one tensor per expert (``experts.{i}.gate_proj``
    and ``up_proj`` concatenated gate first, ``experts.{i}.down_proj``; Mixtral's w1, w3, w2).

    With ``span`` = [start, end) of the intermediate dim (a tensor-parallel rank's), only that slice of
    every expert is read: rows start..end of gate and the same rows of up (so the merged halves stay
    gate first), columns start..end of down. With ``experts`` (an expert-parallel rank's slots: a logical
    expert each, a replica repeating one), only those are returned, in that order: one tensor per expert
    reads only theirs; a fused tensor is read whole (its span) and indexed. ``shape`` is the shape of what
    is returned.
    """
    size = moe.expert_intermediate_size
    start, end = span or (0, size)
    gate_up = name.endswith("gate_up_proj")
    every = list(range(moe.num_experts))
    chosen = every if experts is None else list(experts)
    if name in checkpoint:
        if not gate_up:
            stacked = checkpoint.load(name, (moe.num_experts, shape[1], size), dtype, (2, start, end))
        else:
            whole = (moe.num_experts, 2 * size, shape[2])
            halves = [checkpoint.load(name, whole, dtype, (1, offset + start, offset + end)) for offset in (0, size)]
            stacked = torch.cat(halves, dim=1)
        return stacked if chosen == every else stacked[chosen]
    prefix, _ = name.rsplit(".", 1)
    gate, up, down = moe.expert_projections
    if f"{prefix}.{moe.num_experts}.{gate}.weight" in checkpoint:
        raise CheckpointError(
            f"checkpoint holds tensor '{prefix}.{moe.num_experts}.{gate}.weight': more experts than the "
            f"{moe.num_experts} config.json declares"
        )

    def expert(i: int) -> torch.Tensor:
        if not gate_up:
            return checkpoint.load(f"{prefix}.{i}.{down}.weight", (shape[1], size), dtype, (1, start, end))
        rows = [
            checkpoint.load(f"{prefix}.{i}.{part}.weight", (size, shape[2]), dtype, (0, start, end))
            for part in (gate, up)
        ]
        return torch.cat(rows)

    return torch.stack([expert(i) for i in chosen])
