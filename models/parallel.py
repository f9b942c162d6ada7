"""Tensor and expert parallelism of the decoder: which dims and experts each rank holds, and how
checkpoint tensors shard.

Attention is split by groups of KV heads (each rank owns num_kv_heads / tp KV heads and the query
heads that read them), the MLP by intermediate columns. Projections into a layer (q, k, v, gate, up)
are column-parallel; projections out of it (o, down) row-parallel, each followed by an all-reduce.
MoE layers split every routed expert (and Qwen2-MoE's shared expert) the same way, on the expert
intermediate dim, while the router stays replicated: every rank routes identically, each returns a
partial sum over its slice of every expert, and the shared expert's partial is added before the one
all-reduce of the layer (as xLLM does), not after a second.
The embedding and LM head are replicated: at the sizes this project targets they are cheap next to
the layers, and sharding them would add two collectives per step (a gather of logits, a reduce of
embeddings) on the path every token takes.

Expert parallelism (``--ep N``) gives rank r the contiguous experts [r * E/N, (r + 1) * E/N) of every
MoE layer and replicates everything else: attention, the router, dense layers' MLPs and Qwen2-MoE's
shared expert (each rank computes them for every token, as EP without data-parallel attention does).
Tokens then need no dispatch at all: every rank already holds every token's hidden state, runs its
own experts over the rows routed to them and skips the rest, and one all-reduce of the [T, H] partial
sums is the layer's output (the shared expert's replicated output is added after it, once). This is
the all-gather + reduce-scatter scheme with the all-gather free (attention is replicated, so every
rank already has every token) and the reduce-scatter + the next layer's all-gather done as the one
all-reduce they add up to. Why not all-to-all: with data-dependent split sizes it breaks static
shapes per bucket and graph capture (the host must read the splits), and with static, worst-case
capacities each rank would send (N-1)/N * T * min(k, E/N) rows per direction, never fewer than the
all-reduce's 2 (N-1)/N * T rows. The all-reduce is also what the overlap passes already split and
schedule (passes/comm). Which experts a rank holds is data (an int64 ``expert_table`` weight per
layer, ops/moe.py), not a literal, so every rank traces the very same graph.
``--tp`` and ``--ep`` do not combine yet: one of them must be 1 (refused otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xllm_compiler.errors import ConfigError, OptionsError
from xllm_compiler.experts.placement import Placement
from xllm_compiler.models.config import ModelSpec

#: Checkpoint tensor (by name suffix) -> the dim it is split along across ranks.
#: (Routed experts are stacked, and sharded as they load: models/weights.py's ``load_experts``.)
COLUMN_PARALLEL = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "shared_expert.gate_proj",
    "shared_expert.up_proj",
    "shared_experts.gate_proj",
    "shared_experts.up_proj",
    "self_attn.q_b_proj",  # MLA: split by heads; q_a_proj and kv_a_proj_with_mqa (the latent) stay whole
    "self_attn.kv_b_proj",
)
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj", "shared_expert.down_proj", "shared_experts.down_proj")
#: Collectives are traced with this group name; the runtime binds the real process group's name.
TRACED_GROUP = "tp"


@dataclass(frozen=True)
class ExpertParallel:
    """This rank's place in an expert-parallel group (size 1: every rank holds every expert), and the
    placement plan of the experts over the ranks (None: contiguous, one replica each)."""

    rank: int = 0
    size: int = 1
    placement: Placement | None = None

    def check(self, spec: ModelSpec) -> None:
        """Refuse a dense model, or an expert count the ranks do not divide."""
        if self.size == 1:
            return
        if spec.moe is None:
            raise OptionsError(f"--ep {self.size}: {spec.architecture} has no experts to distribute")
        if spec.moe.num_experts % self.size:
            raise OptionsError(f"--ep {self.size} does not divide {spec.architecture}'s {spec.moe.num_experts} experts")

    def span(self, num_experts: int) -> tuple[int, int]:
        """[start, end) of the experts this rank holds."""
        part = num_experts // self.size
        return self.rank * part, (self.rank + 1) * part

    def rows(self, moe_layer: int, num_experts: int) -> list[int]:
        """The logical expert in each of this rank's physical slots of MoE layer ``moe_layer``."""
        if self.placement is None:
            return list(range(*self.span(num_experts)))
        return self.placement.layers[moe_layer].slots[self.rank]

    def expert_table(self, moe_layer: int, num_experts: int) -> tuple[torch.Tensor, int]:
        """(table, columns) of ops/moe.py for MoE layer ``moe_layer``: for expert e and column j, at
        e * columns + j, the slot serving it on this rank, or -1. Without a plan, one column each."""
        if self.placement is None:
            table = [-1] * num_experts
            for slot, expert in enumerate(self.rows(moe_layer, num_experts)):
                table[expert] = slot
            return torch.tensor(table, dtype=torch.int64, device="cpu"), 1
        plan = self.placement.layers[moe_layer]
        return torch.tensor(plan.table(self.rank), dtype=torch.int64, device="cpu"), len(plan.columns[0])


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in a tensor-parallel group (size 1: no parallelism), and in the expert-parallel
    group that shares the same ranks (``ep``; --tp and --ep do not combine yet)."""

    rank: int = 0
    size: int = 1
    ep: ExpertParallel = field(default_factory=ExpertParallel)

    def check(self, spec: ModelSpec) -> None:
        """Refuse a model whose heads, MLP or experts do not divide evenly over the ranks."""
        self.ep.check(spec)
        for what, count in (
            ("expert intermediate size", spec.moe.expert_intermediate_size if spec.moe else 0),
            ("shared expert intermediate size", spec.moe.shared_expert_size if spec.moe else 0),
        ):
            if count % self.size:
                raise OptionsError(
                    f"--tp {self.size}: {spec.architecture}'s {what} {count} is not divisible by {self.size}"
                )
        for what, count in (
            ("num_key_value_heads", spec.num_kv_heads),
            ("num_attention_heads", spec.num_heads),
            ("intermediate_size", spec.intermediate_size),
        ):
            if count % self.size:
                raise ConfigError(f"{what} {count} is not divisible by tensor-parallel size {self.size}")

    def shard_dim(self, name: str) -> int | None:
        """The dim tensor ``name`` is split along, or None if every rank holds all of it."""
        module, _, leaf = name.rpartition(".")
        if self.size == 1:
            return None
        if module.endswith(COLUMN_PARALLEL):
            return 0
        if module.endswith(ROW_PARALLEL) and leaf == "weight":
            return 1
        return None

    def local(self, count: int) -> int:
        return count // self.size

    def span(self, count: int) -> tuple[int, int]:
        """[start, end) of this rank's part of a dim of size ``count``."""
        part = count // self.size
        return self.rank * part, (self.rank + 1) * part


def parallel_ranks(tp: int, ep: int, placement: Placement | None = None) -> list[TensorParallel]:
    """Every rank's place for ``--tp tp --ep ep`` (and the experts' placement plan, with ep); OptionsError
    if both are above 1."""
    if tp > 1 and ep > 1:
        raise OptionsError(f"--tp {tp} and --ep {ep} do not combine yet: use one of them (the other 1)")
    if ep > 1:
        return [TensorParallel(ep=ExpertParallel(rank, ep, placement)) for rank in range(ep)]
    return [TensorParallel(rank, tp) for rank in range(tp)]
