"""Build one step's graph inputs: flatten the new tokens of several sequences, padded to a bucket."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xllm_compiler.interface import PAD_SLOT
from xllm_compiler.runtime.requests import SamplingParams


@dataclass(eq=False)
class Sequence:
    """One request's tokens and where its KV cache lives.

    ``blocks`` cover the tokens computed so far (and those a step is about to compute): they grow with the
    sequence. ``block_hashes`` are the prefix-cache keys of its first full blocks (runtime/prefix_cache.py).
    Compared by identity: two requests with the same tokens are still two sequences.
    """

    tokens: list[int]
    prompt_len: int
    max_new_tokens: int = 0
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    finished: bool = False
    request_id: str = ""
    params: SamplingParams = field(default_factory=SamplingParams)
    generator: torch.Generator | None = None
    stop_token_ids: frozenset[int] = frozenset()
    block_hashes: list[bytes] = field(default_factory=list)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


def build_step_inputs(
    work: list[tuple[Sequence, int]],
    num_tokens: int,
    num_seqs: int,
    block_size: int,
    max_blocks_per_seq: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Inputs for running ``n`` new tokens of each (sequence, n), padded to num_tokens / num_seqs.

    Padding tokens write their K/V to the reserved slot and belong to no sequence; padding sequences
    have no tokens and their logits row points at token 0 (it is dropped).

    The int64 inputs are views of one tensor and the int32 ones of another: two tensors made (and, off the
    CPU, moved) a step instead of seven. At batch 1 this runs right after the weights have streamed through
    the caches, where every torch call from Python runs cold (docs/performance.md).
    """
    ids, positions, slots = [], [], []
    query_lens, seq_lens, logits_indices = [], [], []
    tables = [0] * (num_seqs * max_blocks_per_seq)
    for row, (seq, count) in enumerate(work):
        if len(seq.blocks) > max_blocks_per_seq:
            raise ValueError(f"a sequence holds {len(seq.blocks)} KV blocks; its block table has {max_blocks_per_seq}")
        start = seq.num_computed
        for pos in range(start, start + count):
            ids.append(seq.tokens[pos])
            positions.append(pos)
            slots.append(seq.blocks[pos // block_size] * block_size + pos % block_size)
        query_lens.append(count)
        seq_lens.append(start + count)
        logits_indices.append(len(ids) - 1)
        tables[row * max_blocks_per_seq : row * max_blocks_per_seq + len(seq.blocks)] = seq.blocks
    pad_tokens, pad_seqs = num_tokens - len(ids), num_seqs - len(work)
    ids += [0] * pad_tokens
    positions += [0] * pad_tokens
    slots += [PAD_SLOT] * pad_tokens
    query_lens += [0] * pad_seqs
    seq_lens += [0] * pad_seqs
    logits_indices += [0] * pad_seqs
    longs = torch.tensor(ids + positions + slots + logits_indices, dtype=torch.int64)
    ints = torch.tensor(query_lens + seq_lens + tables, dtype=torch.int32)
    if device.type != "cpu":
        longs, ints = longs.to(device), ints.to(device)
    int64_names = ("input_ids", "positions", "slot_mapping", "logits_indices")
    inputs = dict(zip(int64_names, longs.split([num_tokens, num_tokens, num_tokens, num_seqs]), strict=True))
    inputs["query_lens"], inputs["seq_lens"], block_tables = ints.split([num_seqs, num_seqs, len(tables)])
    inputs["block_tables"] = block_tables.view(num_seqs, max_blocks_per_seq)
    return inputs
