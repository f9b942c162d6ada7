"""load(): verify an artifact, then build the runtime over it. Never imports models/ or passes/.

Everything read is data: manifest and graphs are JSON (ops checked against the allowlist), weights
are safetensors. Nothing is unpickled and no code from the artifact runs.

The order is chosen so that nothing large happens before the load is known to fit: manifest (typed,
every file present at its size), graphs (hashed first: they are small), the memory plan (weights,
arena and KV pool against the device's memory), and only then the weights, whose hash is computed
on background threads while they are read and is awaited before ``load()`` returns.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import fx

import xllm_compiler.ops  # noqa: F401  (registers the xllm ops the graphs call)
from xllm_compiler.artifact.graph_format import ArenaBuffer, deserialize_graph, read_memory_plan
from xllm_compiler.artifact.manifest import FileVerifier, read_manifest
from xllm_compiler.artifact.schema import FALLBACK_GRAPH
from xllm_compiler.dtypes import MODEL_DTYPES
from xllm_compiler.errors import ArtifactError
from xllm_compiler.interface import STEP_INPUTS
from xllm_compiler.runtime.engine import Engine
from xllm_compiler.runtime.graph_cache import GraphCache
from xllm_compiler.runtime.kv_cache import BlockPool, KVCache
from xllm_compiler.runtime.memory_budget import plan_load_memory
from xllm_compiler.runtime.model import CompiledModel
from xllm_compiler.runtime.parallel import TensorParallelGroup
from xllm_compiler.runtime.platform import get_platform
from xllm_compiler.runtime.replay import runner_factory
from xllm_compiler.runtime.weights import PrepareWeight, read_weights


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


def _read_weights(
    root: Path, rel: str, device: torch.device, verifier: FileVerifier, prepare: PrepareWeight | None
) -> dict[str, torch.Tensor]:
    try:
        return read_weights(root / rel, device, prepare)
    except (SafetensorError, OSError) as exc:
        verifier.wait([rel])  # a damaged file is better named by its hash than by the parser
        raise ArtifactError(f"artifact file {rel} cannot be read ({exc})") from None


def _fresh_expert_counts(graph: fx.Graph, weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Each MoE layer's routing-counts buffer (the ``expert_counts`` the MoE ops add into, ops/moe.py), in
    layer order, replaced by a zeroed tensor of its own: the graphs write it in place, and the weights as
    read are the file's map, which nothing writes. ``CompiledModel.expert_stats`` reads them."""
    names: list[str] = []
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        arguments = {**dict(zip((a.name for a in schema.arguments), node.args, strict=False)), **node.kwargs}
        counts = arguments.get("expert_counts")
        if isinstance(counts, fx.Node) and counts.op == "get_attr" and counts.target not in names:
            names.append(str(counts.target))
    for name in names:
        weights[name] = torch.zeros_like(weights[name])
    return tuple(weights[name] for name in names)


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
    the largest decode bucket of full-length sequences, or as many of them as the available memory
    holds (runtime/memory_budget.py). A pool that cannot fit is refused before anything large is
    allocated. ``max_resident_graphs`` bounds how many bucket graphs stay built at once (default: all).
    """
    root = Path(path)
    manifest = read_manifest(root, verify=False)
    platform = get_platform(device or manifest.target_device)
    torch_device = platform.device()
    platform.register_kernels()
    layout = manifest.tensor_parallel
    experts = f"expert-parallel (ep={layout.expert_parallel})" if layout.expert_parallel > 1 else None
    group = TensorParallelGroup(layout.size, torch_device, experts)
    weights_name = manifest.tensor_parallel.weights[group.rank]
    graph_files = manifest.graph_files()
    others = set(manifest.tensor_parallel.weights) - {weights_name}  # each rank verifies the shards it reads
    verified = [rel for rel in manifest.files if rel not in others]
    verifier = FileVerifier(root, manifest, verified)
    verifier.wait([rel for rel in verified if rel != weights_name])  # the weights' hash runs on while they are read

    read = {name: _read_graph(root, rel, torch_device) for name, rel in graph_files.items()}
    arena_bytes = max(size for _, size, _ in read.values())
    memory = plan_load_memory(
        manifest,
        arena_bytes,
        available_bytes=platform.free_memory_bytes(),
        total_bytes=platform.total_memory_bytes(),
        kv_blocks=kv_blocks,
        max_memory_utilization=max_memory_utilization,
    )

    graphs = {name: graph for name, (graph, _, _) in read.items()}
    weights = _read_weights(root, weights_name, torch_device, verifier, platform.weight_preparer(graphs))
    platform.place_weights(weights)
    expert_counts = _fresh_expert_counts(graphs[FALLBACK_GRAPH], weights)
    arena = torch.empty(arena_bytes, dtype=torch.uint8, device=torch_device)
    views = {name: arena_views(arena, buffers) for name, (_, _, buffers) in read.items()}
    group.bind(graphs)
    platform.lower(graphs, weights)
    buckets = [b.bucket for b in manifest.buckets]
    plans = {name: size for name, (_, size, _) in read.items() if size}
    cache = GraphCache(graphs, buckets, weights, max_resident_graphs, arena, views, plans, runner_factory(platform))

    model = manifest.model
    kv_cache = KVCache(
        num_layers=model.num_layers,
        num_blocks=memory.kv_blocks,
        block_size=manifest.kv_cache.block_size,
        num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim,
        dtype=MODEL_DTYPES[model.dtype],
        device=torch_device,
        planes=manifest.kv_cache.planes,
    )
    pool = BlockPool(memory.kv_blocks, on_first_use=kv_cache.zero_blocks)
    # The prefix cache's keys start from what fixes the K/V a prompt produces on this rank (runtime/prefix_cache.py).
    prefix_seed = f"{manifest.cache_key}:{manifest.files[weights_name].sha256}".encode()
    engine = Engine(cache, kv_cache, pool, model.max_seq_len, torch_device, group, prefix_seed)
    verifier.wait()
    compiled = CompiledModel(root, manifest, engine, memory)
    compiled.expert_counts = expert_counts
    return compiled
