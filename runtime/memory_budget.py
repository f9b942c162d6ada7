"""How big a load is, decided from the manifest and the device's memory before anything large is allocated.

A load needs the weights, the activation arena (the largest bucket's memory plan) and the KV block
pool. The pool is the only part with a choice, and it is made here, up front, so that a plan that
cannot fit fails in ``load()`` with the sizes named and the options that fix it, instead of an
allocator error after the weights were read:

- ``kv_blocks`` given: that many blocks, if they fit in the memory available now;
- ``max_memory_utilization`` given (xLLM's and vLLM's flag): the blocks that fit in that share of the
  device's memory once weights and arena are in;
- neither: room for the largest decode bucket of full-length sequences, shrunk to as many full-length
  sequences as fit in ``DEFAULT_UTILIZATION`` of the available memory (never below one).

The compiler calls the same functions to put the load's memory in the report and to warn when a plan
cannot fit the machine it compiles on.
"""

from __future__ import annotations

from dataclasses import dataclass

from xllm_compiler.artifact.schema import Manifest
from xllm_compiler.buckets.policy import DECODE
from xllm_compiler.dtypes import MODEL_DTYPES
from xllm_compiler.errors import OptionsError
from xllm_compiler.sizes import format_bytes

#: Share of the available memory the default KV pool may fill (the rest: the process, the OS, the arena's
#: neighbours). vLLM's default gpu_memory_utilization is the same 0.9.
DEFAULT_UTILIZATION = 0.9

#: Why the pool has the size it has, as memory_stats() reports it.
SIZED_BY_KV_BLOCKS = "kv_blocks"
SIZED_BY_UTILIZATION = "max_memory_utilization"
SIZED_BY_BUCKETS = "decode_buckets"
SIZED_BY_MEMORY = "available_memory"


@dataclass(frozen=True)
class LoadMemory:
    """The bytes a load takes, part by part, and how the KV pool was sized."""

    weight_bytes: int
    arena_bytes: int
    kv_block_bytes: int
    kv_blocks: int
    sized_by: str

    @property
    def kv_bytes(self) -> int:
        return self.kv_blocks * self.kv_block_bytes

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.arena_bytes + self.kv_bytes

    def to_json(self) -> dict[str, int | str]:
        return {
            "weight_bytes": self.weight_bytes,
            "arena_bytes": self.arena_bytes,
            "kv_block_bytes": self.kv_block_bytes,
            "kv_blocks": self.kv_blocks,
            "kv_bytes": self.kv_bytes,
            "total_bytes": self.total_bytes,
            "kv_pool_sized_by": self.sized_by,
        }


def kv_bytes_per_token(manifest: Manifest) -> int:
    """What the cache keeps of one token, every layer, in the model's dtype: K and V (MLA: its latent row)."""
    model = manifest.model
    row = manifest.kv_cache.planes * model.num_kv_heads * model.head_dim
    return model.num_layers * row * MODEL_DTYPES[model.dtype].itemsize


def expanded_kv_bytes_per_token(manifest: Manifest) -> int:
    """For MLA: what expanded K and V of one token would take, every layer (0 for other attention)."""
    model = manifest.model
    return model.num_layers * manifest.kv_cache.expanded_width * MODEL_DTYPES[model.dtype].itemsize


def kv_block_bytes(manifest: Manifest) -> int:
    return manifest.kv_cache.block_size * kv_bytes_per_token(manifest)


def blocks_per_sequence(manifest: Manifest) -> int:
    """Blocks one sequence of max_seq_len tokens occupies."""
    return -(-manifest.model.max_seq_len // manifest.kv_cache.block_size)


def max_decode_batch(manifest: Manifest) -> int:
    return max((b.num_tokens for b in manifest.buckets if b.phase == DECODE), default=1)


def plan_load_memory(
    manifest: Manifest,
    arena_bytes: int,
    available_bytes: int,
    total_bytes: int,
    kv_blocks: int | None = None,
    max_memory_utilization: float | None = None,
) -> LoadMemory:
    """The load's memory, KV pool included; OptionsError (naming the sizes and the options that fix
    it) when it cannot fit in ``available_bytes``."""
    weights, block = manifest.weight_bytes, kv_block_bytes(manifest)
    reserved = manifest.kv_cache.reserved_blocks
    fixed = weights + arena_bytes
    parts = f"the weights ({format_bytes(weights)}) and the arena ({format_bytes(arena_bytes)})"
    available = f"{format_bytes(available_bytes)} available"

    def plan(blocks: int, sized_by: str) -> LoadMemory:
        return LoadMemory(weights, arena_bytes, block, blocks, sized_by)

    if kv_blocks is not None:
        if isinstance(kv_blocks, bool) or not isinstance(kv_blocks, int) or kv_blocks <= reserved:
            raise OptionsError(f"kv_blocks must be an integer > {reserved}, got {kv_blocks!r}")
        if fixed + kv_blocks * block > available_bytes:
            most = max(0, (available_bytes - fixed) // block)
            raise OptionsError(
                f"kv_blocks {kv_blocks} need {format_bytes(kv_blocks * block)} of KV cache on top of {parts}, "
                f"but {available} is: at most {most} blocks fit"
            )
        return plan(kv_blocks, SIZED_BY_KV_BLOCKS)
    if max_memory_utilization is not None:
        utilization = max_memory_utilization
        if isinstance(utilization, bool) or not isinstance(utilization, (int, float)) or not 0 < utilization <= 1:
            raise OptionsError(f"max_memory_utilization must be in (0, 1], got {utilization!r}")
        share = utilization * total_bytes
        blocks = int((share - fixed) // block)  # the reserved block counts too
        if blocks <= reserved:
            raise OptionsError(
                f"max_memory_utilization {utilization} leaves no room for the KV cache: {parts} take "
                f"{format_bytes(fixed)} of {format_bytes(share)}"
            )
        if fixed + blocks * block > available_bytes:
            raise OptionsError(
                f"max_memory_utilization {utilization} asks for {format_bytes(fixed + blocks * block)} ({parts} "
                f"and {blocks} KV blocks), but {available} is: pass a smaller share or --kv-blocks N"
            )
        return plan(blocks, SIZED_BY_UTILIZATION)
    per_seq = blocks_per_sequence(manifest)
    wanted = max_decode_batch(manifest)
    fitting = int((DEFAULT_UTILIZATION * available_bytes - fixed - reserved * block) // (per_seq * block))
    if fitting < 1:
        left = format_bytes(max(0, DEFAULT_UTILIZATION * available_bytes - fixed))
        raise OptionsError(
            f"the KV cache for one {manifest.model.max_seq_len}-token sequence needs {format_bytes(per_seq * block)}, "
            f"but only {left} of the {available} is left after {parts}: pass --kv-blocks N or "
            "--max-memory-utilization F to xllm-run (kv_blocks=, max_memory_utilization= to load()), or recompile "
            "with a smaller --max-seq-len"
        )
    sequences = min(wanted, fitting)
    return plan(sequences * per_seq + reserved, SIZED_BY_BUCKETS if sequences == wanted else SIZED_BY_MEMORY)
