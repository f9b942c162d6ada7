"""Tensor parallelism of the decoder: which dims each rank holds, and how checkpoint tensors shard.

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
"""

from __future__ import annotations

from dataclasses import dataclass

from xllm_compiler.errors import ConfigError, OptionsError
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
)
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj", "shared_expert.down_proj")
#: Collectives are traced with this group name; the runtime binds the real process group's name.
TRACED_GROUP = "tp"


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in a tensor-parallel group (size 1: no parallelism)."""

    rank: int = 0
    size: int = 1

    def check(self, spec: ModelSpec) -> None:
        """Refuse a model whose heads, MLP or experts do not divide evenly over the ranks."""
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
