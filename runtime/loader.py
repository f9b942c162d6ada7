"""load(): verify an artifact, then build the runtime over it. Never imports models/ or passes/.

Everything read is data: manifest and graphs are JSON (ops checked against the allowlist), weights
are safetensors. Nothing is unpickled and no code from the artifact runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import fx

import xllm_compiler.ops  # noqa: F401  (registers the xllm ops the graphs call)
from xllm_compiler.artifact.graph_format import ArenaBuffer, deserialize_graph, read_memory_plan
from xllm_compiler.artifact.manifest import read_manifest
from xllm_compiler.artifact.writer import WEIGHTS_FILE
from xllm_compiler.buckets.policy import PREFILL, Bucket
from xllm_compiler.errors import ArtifactError, OptionsError
from xllm_compiler.interface import RESERVED_BLOCKS, STEP_INPUTS
from xllm_compiler.runtime.engine import Engine
from xllm_compiler.runtime.graph_cache import GraphCache
from xllm_compiler.runtime.kv_cache import BlockPool, KVCache
from xllm_compiler.runtime.model import CompiledModel
from xllm_compiler.runtime.parallel import TensorParallelGroup
from xllm_compiler.runtime.platform import get_platform
from xllm_compiler.runtime.scheduler import Scheduler

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _field(manifest: dict[str, Any], *keys: str) -> Any:
    value: Any = manifest
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise ArtifactError(f"manifest.json lacks '{'.'.join(keys)}'")
        value = value[key]
    return value


def _listed(manifest: dict[str, Any], rel: Any) -> str:
    """``rel``, if the manifest lists (and so has verified) it; the runtime reads no other file."""
    if not isinstance(rel, str) or rel not in manifest["files"]:
        raise ArtifactError(f"manifest.json names '{rel}', which its 'files' list does not cover")
    return rel


def _read_graph(root: Path, rel: str, device: torch.device) -> tuple[fx.Graph, int, dict[str, ArenaBuffer]]:
    """A graph file's graph and its memory plan (arena bytes, buffers)."""
    try:
        data = json.loads((root / rel).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"artifact file {rel} is not valid JSON ({exc})") from None
    graph = deserialize_graph(data, device, where=f"artifact file {rel}")
    arena_bytes, buffers = read_memory_plan(data, where=f"artifact file {rel}")
    expected = [s.name for s in STEP_INPUTS]
    inputs = [n.name for n in graph.nodes if n.op == "placeholder"]
    if inputs[: len(expected)] != expected:
        raise ArtifactError(f"artifact file {rel}: graph inputs {inputs[: len(expected)]} are not {expected}")
    return graph, arena_bytes, buffers


def arena_views(arena: torch.Tensor, buffers: dict[str, ArenaBuffer]) -> dict[str, torch.Tensor]:
    """Each planned buffer as a view of the one arena: the same addresses on every call."""
    return {name: arena[b.offset : b.offset + b.nbytes].view(b.dtype).view(b.shape) for name, b in buffers.items()}


def default_kv_blocks(manifest: dict[str, Any]) -> int:
    """Room for the largest decode bucket of full-length sequences (the reserved block included)."""
    block_size = _field(manifest, "kv_cache", "block_size")
    per_seq = -(-_field(manifest, "model", "max_seq_len") // block_size)
    max_batch = max(_field(manifest, "options", "decode_buckets"))
    return max_batch * per_seq + RESERVED_BLOCKS


def blocks_for_utilization(utilization: float, total_bytes: int, used_bytes: int, block_bytes: int) -> int:
    """KV blocks that fit in ``utilization`` of the device's memory once weights and arena are in."""
    if isinstance(utilization, bool) or not isinstance(utilization, (int, float)) or not 0 < utilization <= 1:
        raise OptionsError(f"max_memory_utilization must be in (0, 1], got {utilization!r}")
    budget = utilization * total_bytes - used_bytes
    blocks = int(budget // block_bytes)  # the reserved padding block counts against the budget too
    if blocks <= RESERVED_BLOCKS:
        raise OptionsError(
            f"max_memory_utilization {utilization} leaves no room for the KV cache: weights and arena take "
            f"{used_bytes / 2**20:.0f} MiB of {utilization * total_bytes / 2**20:.0f} MiB"
        )
    return blocks


def load(
    path: str | Path,
    device: str | None = None,
    kv_blocks: int | None = None,
    max_resident_graphs: int | None = None,
    max_memory_utilization: float | None = None,
) -> CompiledModel:
    """Load a compiled artifact.

    ``device`` defaults to the one it was compiled for. The KV pool holds ``kv_blocks`` blocks when
    given; else, with ``max_memory_utilization`` (xLLM's flag: the share of the device's memory the
    model may use), as many blocks as fit in that share after the weights and the arena; else room for
    the largest decode bucket of full-length sequences. ``max_resident_graphs`` bounds how many bucket
    graphs stay built at once (default: all).
    """
    root = Path(path)
    manifest = read_manifest(root)
    platform = get_platform(device or _field(manifest, "target_device"))
    torch_device = platform.device()
    platform.register_kernels()

    parallel = manifest.get("tensor_parallel") or {"size": 1, "weights": [WEIGHTS_FILE]}
    try:
        size, weight_files = int(parallel["size"]), [str(f) for f in parallel["weights"]]
        assert size >= 1 and len(weight_files) == size
    except (KeyError, TypeError, ValueError, AssertionError):
        raise ArtifactError("manifest.json has a malformed 'tensor_parallel' entry") from None
    group = TensorParallelGroup(size, torch_device)
    weights_name = weight_files[group.rank]
    try:
        weights = load_file(str(root / _listed(manifest, weights_name)), device=str(torch_device))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"artifact file {weights_name} cannot be read ({exc})") from None
    graph_files = _field(manifest, "graphs")
    if not isinstance(graph_files, dict):
        raise ArtifactError("manifest.json 'graphs' must map graph names to files")
    read = {name: _read_graph(root, _listed(manifest, rel), torch_device) for name, rel in graph_files.items()}
    graphs = {name: graph for name, (graph, _, _) in read.items()}
    arena = torch.empty(max(size for _, size, _ in read.values()), dtype=torch.uint8, device=torch_device)
    views = {name: arena_views(arena, buffers) for name, (_, _, buffers) in read.items()}
    weight_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    group.bind(graphs)
    platform.lower(graphs, weights)
    try:
        buckets = [Bucket(b["phase"], int(b["num_tokens"]), int(b["num_seqs"])) for b in _field(manifest, "buckets")]
    except (TypeError, KeyError, ValueError):
        raise ArtifactError("manifest.json has a malformed 'buckets' entry") from None
    plans = {name: size for name, (_, size, _) in read.items() if size}
    cache = GraphCache(graphs, buckets, weights, max_resident_graphs, arena, views, plans)

    model = _field(manifest, "model")
    dtype_name = model.get("dtype")
    if dtype_name not in DTYPES:
        raise ArtifactError(f"manifest.json model dtype {dtype_name!r} is not supported")
    block_size = _field(manifest, "kv_cache", "block_size")
    block_bytes = KVCache.bytes_per_block(
        model["num_layers"], block_size, model["num_kv_heads"], model["head_dim"], DTYPES[dtype_name]
    )
    if kv_blocks is not None:
        num_blocks = kv_blocks
    elif max_memory_utilization is not None:
        used = weight_bytes + arena.numel()
        num_blocks = blocks_for_utilization(max_memory_utilization, platform.total_memory_bytes(), used, block_bytes)
    else:
        num_blocks = default_kv_blocks(manifest)
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= RESERVED_BLOCKS:
        raise OptionsError(f"kv_blocks must be an integer > {RESERVED_BLOCKS}, got {num_blocks!r}")
    kv_cache = KVCache(
        num_layers=model["num_layers"],
        num_blocks=num_blocks,
        block_size=block_size,
        num_kv_heads=model["num_kv_heads"],
        head_dim=model["head_dim"],
        dtype=DTYPES[dtype_name],
        device=torch_device,
    )
    pool = BlockPool(num_blocks, on_first_use=kv_cache.zero_blocks)
    engine = Engine(cache, kv_cache, pool, model["max_seq_len"], torch_device, group)
    prefill = [b for b in buckets if b.phase == PREFILL]
    scheduler = Scheduler(
        engine,
        max_prefill_tokens=max((b.num_tokens for b in prefill), default=model["max_seq_len"]),
        max_prefill_seqs=max((b.num_seqs for b in prefill), default=1),
    )
    return CompiledModel(root, manifest, engine, scheduler)
