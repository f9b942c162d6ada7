"""The per-shape graph cache: pick the smallest bucket a step fits, else the dynamic fallback graph.

All graph files are parsed and checked when the artifact loads (so a bad one fails in ``load()``);
the executable GraphModule of each is built on first use.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx

from xllm_compiler.buckets.policy import Bucket
from xllm_compiler.errors import ArtifactError

FALLBACK = "dynamic"


@dataclass(frozen=True)
class Choice:
    """The graph a step runs on, and the sizes its inputs are padded to."""

    graph: str
    num_tokens: int
    num_seqs: int


class GraphCache:
    def __init__(self, graphs: dict[str, fx.Graph], buckets: list[Bucket], weights: dict[str, torch.Tensor]):
        if FALLBACK not in graphs:
            raise ArtifactError(f"the artifact has no '{FALLBACK}' fallback graph")
        missing = [b.name for b in buckets if b.name not in graphs]
        if missing:
            raise ArtifactError(f"the manifest lists bucket {missing[0]} but the artifact has no graph for it")
        for name, graph in graphs.items():
            for node in graph.nodes:
                if node.op == "get_attr" and node.target not in weights:
                    raise ArtifactError(f"graph {name} uses weight '{node.target}', which weights.safetensors lacks")
        self._graphs = graphs
        self._weights = weights
        self._modules: dict[str, fx.GraphModule] = {}
        self.buckets = sorted(buckets, key=lambda b: (b.num_tokens, b.num_seqs))
        self.counters: Counter[str] = Counter()

    def choose(self, phase: str, num_tokens: int, num_seqs: int) -> Choice:
        """The smallest bucket of ``phase`` holding the step, else the fallback at the exact size."""
        for bucket in self.buckets:
            if bucket.phase == phase and bucket.num_tokens >= num_tokens and bucket.num_seqs >= num_seqs:
                self.counters["hits"] += 1
                self.counters["padded_tokens"] += bucket.num_tokens - num_tokens
                return Choice(bucket.name, bucket.num_tokens, bucket.num_seqs)
        self.counters["fallbacks"] += 1
        return Choice(FALLBACK, num_tokens, num_seqs)

    def module(self, name: str) -> fx.GraphModule:
        if name not in self._modules:
            self._modules[name] = fx.GraphModule(self._weights, self._graphs[name])
        return self._modules[name]
