"""Memory-planner tests, and what they share: bucket graphs of real models before and after plan_memory,
a brute-force peak of live bytes, and binding a plan's buffers to a real arena so a planned graph runs.

Model graphs are built once per session (tracing is most of their cost) and handed out as they are: tests
must not edit them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx

from tests.passes.graphs import cached_build_graph, copy_graph_module
from xllm_compiler import testing
from xllm_compiler.artifact.graph_format import ArenaBuffer
from xllm_compiler.buckets import Bucket, make_buckets
from xllm_compiler.buckets.specialize import specialize
from xllm_compiler.capture import capture
from xllm_compiler.interface import ARENA_PREFIX, STEP_INPUTS, kv_cache_input
from xllm_compiler.models import build_model, load_spec
from xllm_compiler.options import DEFAULT_BLOCK_SIZE, DEFAULT_DECODE_BUCKETS, DEFAULT_PREFILL_BUCKETS, MAX_SEQ_LEN_CAP
from xllm_compiler.passes import PassManager, bucket_pipeline, default_pipeline
from xllm_compiler.passes.memory.plan_memory import ALIGNMENT, MemoryPlan
from xllm_compiler.runtime.loader import arena_views

TINY_LLAMA = Path(__file__).resolve().parents[3] / "tools" / "tiny-llama"


@dataclass
class BucketGraphs:
    """One bucket of a model: its specialised graph before plan_memory, and a second copy after it."""

    bucket: Bucket
    specialised: fx.GraphModule
    planned: fx.GraphModule

    @property
    def plan(self) -> MemoryPlan:
        return self.planned.meta["memory_plan"]


@dataclass
class ModelBuckets:
    name: str
    graph: fx.GraphModule  # after the default pipeline, before specialisation
    block_size: int
    max_seq_len: int
    buckets: list[BucketGraphs]


def default_buckets(max_seq_len: int) -> list[Bucket]:
    """The buckets a compile with default options makes."""
    return make_buckets(DEFAULT_DECODE_BUCKETS, DEFAULT_PREFILL_BUCKETS, max_seq_len, explicit_prefill=False)


def _plan_buckets(name: str, gm: fx.GraphModule, block_size: int, max_seq_len: int) -> ModelBuckets:
    PassManager(default_pipeline()).run(gm)
    graphs = []
    for bucket in default_buckets(max_seq_len):
        specialised = specialize(gm, bucket)
        specialised.recompile()
        planned = specialize(gm, bucket)
        PassManager(bucket_pipeline()).run(planned)
        graphs.append(BucketGraphs(bucket, specialised, planned))
    return ModelBuckets(name, gm, block_size, max_seq_len, graphs)


_MODELS: dict[str, ModelBuckets] = {}


def _initialised(gm: fx.GraphModule, seed: int = 0) -> fx.GraphModule:
    """``gm`` with seeded random weights in every projection. testing.build_graph leaves the row-parallel
    ones (o_proj, down_proj) as torch.empty, i.e. whatever the memory held (test_plan_memory.py::
    test_tiny_config_weights_are_initialised); numerics of uninitialised weights compare nothing. The
    tensors are replaced, not written: the graph cache shares them with other tests."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in list(gm.named_buffers()):
        if name.endswith("proj.weight"):
            module, _, leaf = name.rpartition(".")
            value = torch.randn(tensor.shape, generator=generator) / tensor.shape[-1] ** 0.5
            setattr(gm.get_submodule(module), leaf, value.to(tensor.dtype))
    return gm


def tiny_config_buckets(architecture: str, dtype: torch.dtype = torch.float32) -> ModelBuckets:
    """Every default bucket of ``architecture``'s tiny config (xllm_compiler.testing), planned."""
    key = f"{architecture}/{dtype}"
    if key not in _MODELS:
        config = testing.tiny_config(architecture)
        gm = _initialised(cached_build_graph(config, dtype))
        _MODELS[key] = _plan_buckets(key, gm, testing.BLOCK_SIZE, config["max_position_embeddings"])
    return _MODELS[key]


def checkpoint_buckets(model_dir: Path = TINY_LLAMA, keep: bool = True) -> ModelBuckets:
    """Every default bucket of a checkpoint, captured and planned in process as xllm-compile does (kept for
    the session unless ``keep`` is false: big models)."""
    key = str(model_dir)
    if key not in _MODELS or not keep:
        spec = load_spec(model_dir)
        max_seq_len = min(spec.max_position_embeddings, MAX_SEQ_LEN_CAP)
        model = build_model(model_dir, torch.float32, max_seq_len, spec)
        kv = [
            kv_cache_input(i, torch.float32, DEFAULT_BLOCK_SIZE, spec.num_kv_heads, spec.head_dim)
            for i in range(spec.num_layers)
        ]
        gm = capture(model, STEP_INPUTS, kv)
        del model
        planned = _plan_buckets(model_dir.name, gm, DEFAULT_BLOCK_SIZE, max_seq_len)
        if not keep:
            return planned
        _MODELS[key] = planned
    return _MODELS[key]


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def peak_live_bytes(intervals: list[tuple[int, int, int]]) -> int:
    """Brute force: the largest, over node indices, sum of ``size`` of the (size, first, last) alive there."""
    if not intervals:
        return 0
    last = max(end for _, _, end in intervals)
    return max(sum(size for size, start, end in intervals if start <= i <= end) for i in range(last + 1))


def runnable(planned: fx.GraphModule, fill: int = 0xFF) -> tuple[fx.GraphModule, torch.Tensor]:
    """A copy of a planned graph whose buffers are real: views of one arena (filled with ``fill`` bytes; 0xFF
    reads as NaN in every float dtype), as the runtime binds them at load. Returns (graph, arena)."""
    plan: MemoryPlan = planned.meta["memory_plan"]
    gm = copy_graph_module(planned)
    gm.recompile()
    arena = torch.full((plan.arena_bytes,), fill, dtype=torch.uint8)
    buffers = {name: ArenaBuffer(b.offset, b.shape, b.dtype) for name, b in plan.buffers.items()}
    holder = gm.get_submodule(ARENA_PREFIX.rstrip("."))
    for name, view in arena_views(arena, buffers).items():
        setattr(holder, name.removeprefix(ARENA_PREFIX), view)
    return gm, arena
