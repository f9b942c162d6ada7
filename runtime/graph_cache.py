"""The per-shape graph cache: pick the smallest bucket a step fits, else the dynamic fallback graph.

Every graph file is parsed and checked when the artifact loads (so a bad one fails in ``load()``);
a graph's executable GraphModule is built when a step first needs it, and at most ``max_resident``
of them stay built (least recently used go first; a later step builds them again).

Bucket graphs write their intermediates into views of one activation arena (sized for the largest
plan), bound as the graph's ``arena.*`` attributes. On a platform that replays graphs, a step runs a
bucket graph through its runner (captured on first use, runtime/replay.py), which is dropped with it;
the fallback graph always runs eagerly.

Counters (``CompiledModel.stats()``): ``hits`` (a step ran on a resident bucket graph), ``misses``
(its bucket graph had to be built first), ``fallbacks`` (no bucket held the step), ``padded_tokens``
(tokens of padding the buckets added), ``steps``.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch
from torch import fx

from xllm_compiler.artifact.schema import FALLBACK_GRAPH as FALLBACK
from xllm_compiler.buckets.policy import ONE_ROW_PER_SEQUENCE, VERIFY, Bucket
from xllm_compiler.errors import ArtifactError, OptionsError
from xllm_compiler.runtime.replay import GraphRunner, RunnerFactory


@dataclass(frozen=True)
class Choice:
    """The graph a step runs on, and the sizes its inputs are padded to."""

    graph: str
    num_tokens: int
    num_seqs: int


class GraphCache:
    def __init__(
        self,
        graphs: dict[str, fx.Graph],
        buckets: list[Bucket],
        weights: dict[str, torch.Tensor],
        max_resident: int | None = None,
        arena: torch.Tensor | None = None,
        arena_views: dict[str, dict[str, torch.Tensor]] | None = None,
        arena_plans: dict[str, int] | None = None,
        replay: RunnerFactory | None = None,
    ):
        if FALLBACK not in graphs:
            raise ArtifactError(f"the artifact has no '{FALLBACK}' fallback graph")
        missing = [b.name for b in buckets if b.name not in graphs]
        if missing:
            raise ArtifactError(f"the manifest lists bucket {missing[0]} but the artifact has no graph for it")
        self.arena = arena if arena is not None else torch.empty(0, dtype=torch.uint8)
        self._views = arena_views or {}
        self.arena_plans = arena_plans or {}  # graph -> the arena bytes its plan needs
        for name, graph in graphs.items():
            for node in graph.nodes:
                known = node.target in weights or node.target in self._views.get(name, {})
                if node.op == "get_attr" and not known:
                    raise ArtifactError(f"graph {name} uses weight '{node.target}', which weights.safetensors lacks")
        if max_resident is not None and (isinstance(max_resident, bool) or max_resident < 1):
            raise OptionsError(f"max_resident_graphs must be a positive integer, got {max_resident!r}")
        self._graphs = graphs
        self._weights = weights
        self._resident: OrderedDict[str, fx.GraphModule] = OrderedDict()
        self._replay = replay
        self._runners: dict[str, GraphRunner] = {}
        self.max_resident = max_resident
        self.buckets = sorted(buckets, key=lambda b: (b.num_tokens, b.num_seqs))
        self.counters: Counter[str] = Counter()

    def choose(self, phase: str, num_tokens: int, num_seqs: int) -> Choice:
        """The smallest bucket of ``phase`` holding the step, else the fallback at the exact size. A verify
        step runs on a verify or a decode bucket: both are decode-shaped (buckets/policy.py)."""
        self.counters["steps"] += 1
        phases = ONE_ROW_PER_SEQUENCE if phase == VERIFY else (phase,)
        for bucket in self.buckets:
            if bucket.phase in phases and bucket.num_tokens >= num_tokens and bucket.num_seqs >= num_seqs:
                self.counters["padded_tokens"] += bucket.num_tokens - num_tokens
                self.counters["hits" if bucket.name in self._resident else "misses"] += 1
                return Choice(bucket.name, bucket.num_tokens, bucket.num_seqs)
        self.counters["fallbacks"] += 1
        return Choice(FALLBACK, num_tokens, num_seqs)

    def module(self, name: str) -> fx.GraphModule:
        """The executable graph ``name``, built if it is not resident (evicting the least recent)."""
        if name in self._resident:
            self._resident.move_to_end(name)
            return self._resident[name]
        module = fx.GraphModule({**self._weights, **self._views.get(name, {})}, self._graphs[name])
        _bind_as_instance_attributes(module)
        self._resident[name] = module
        if self.max_resident is not None:
            while len(self._resident) > self.max_resident:
                self._runners.pop(self._resident.popitem(last=False)[0], None)
        return module

    def runner(self, name: str) -> GraphRunner:
        """What a step calls to run graph ``name``: its replayed form where the platform has one and ``name``
        is a bucket graph, else the module itself."""
        module = self.module(name)
        if self._replay is None or name == FALLBACK:
            return module
        if name not in self._runners:
            self._runners[name] = self._replay(module)
        return self._runners[name]

    def resident(self) -> list[str]:
        return list(self._resident)


def _bind_as_instance_attributes(module: torch.nn.Module) -> None:
    """Give every submodule, parameter and buffer of ``module`` an instance attribute in its owner too.

    The generated forward reads each weight through a chain such as ``self.model.layers`` ... ``.weight``,
    and every hop of it is an ``nn.Module.__getattr__`` call: about 700 per decode step of a 12-layer model,
    half a millisecond at batch 1. Instance attributes resolve before ``__getattr__`` is consulted. The
    registrations stay (``get_buffer`` and ``named_buffers`` still work); a built graph module is never
    re-bound, so the two cannot drift apart.
    """
    for owner in module.modules():
        owner.__dict__.update(owner.named_children())
        owner.__dict__.update(owner.named_parameters(recurse=False))
        owner.__dict__.update(owner.named_buffers(recurse=False))
