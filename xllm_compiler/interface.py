"""The calling convention of every compiled graph: its inputs, their dtypes and symbolic dims.

Models trace with it, the runtime feeds it; it is the one thing both sides must agree on, so it lives
here, and the manifest repeats it so that an artifact can be checked against the runtime reading it.

A step flattens the new tokens of all its sequences into one ``num_tokens`` dim. ``num_seqs`` sizes
the per-sequence metadata and the logits rows (only each sequence's last token reaches the LM head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_TOKENS = "num_tokens"
NUM_SEQS = "num_seqs"
NUM_BLOCKS = "num_blocks"
MAX_BLOCKS_PER_SEQ = "max_blocks_per_seq"

#: get_attr targets under this prefix are activation-arena buffers (placed by the memory planner, bound
#: to views of one arena at load), never weights.
ARENA_PREFIX = "arena."

#: Padding tokens write their K/V here; the block pool never hands block 0 out.
PAD_SLOT = 0
RESERVED_BLOCKS = 1


@dataclass(frozen=True)
class InputSpec:
    """One graph input: its name, dtype and shape (ints, or the names of symbolic dims)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int | str, ...]


STEP_INPUTS: tuple[InputSpec, ...] = (
    InputSpec("input_ids", torch.int64, (NUM_TOKENS,)),
    InputSpec("positions", torch.int64, (NUM_TOKENS,)),
    InputSpec("slot_mapping", torch.int64, (NUM_TOKENS,)),
    InputSpec("query_lens", torch.int32, (NUM_SEQS,)),
    InputSpec("seq_lens", torch.int32, (NUM_SEQS,)),
    InputSpec("block_tables", torch.int32, (NUM_SEQS, MAX_BLOCKS_PER_SEQ)),
    InputSpec("logits_indices", torch.int64, (NUM_SEQS,)),
)


#: Planes of a layer's cache: keys and values (2), or one latent row per token that serves as both (1,
#: multi-head latent attention, ops/mla.py).
KV_PLANES = 2
LATENT_PLANES = 1


def kv_cache_input(
    layer: int, dtype: torch.dtype, block_size: int, num_kv_heads: int, head_dim: int, planes: int = KV_PLANES
) -> InputSpec:
    """Layer ``layer``'s cache in blocks, [planes, num_blocks, block_size, Hkv, D]: keys and values (planes 2),
    or MLA's compressed latent (planes 1, Hkv 1, D = kv_lora_rank + qk_rope_head_dim)."""
    return InputSpec(f"kv_cache_{layer}", dtype, (planes, NUM_BLOCKS, block_size, num_kv_heads, head_dim))
