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
    """
    ids, positions, slots = [], [], []
    query_lens, seq_lens, logits_indices = [], [], []
    block_tables = torch.zeros(num_seqs, max_blocks_per_seq, dtype=torch.int32)
    for row, (seq, count) in enumerate(work):
        start = seq.num_computed
        for pos in range(start, start + count):
            ids.append(seq.tokens[pos])
            positions.append(pos)
            slots.append(seq.blocks[pos // block_size] * block_size + pos % block_size)
        query_lens.append(count)
        seq_lens.append(start + count)
        logits_indices.append(len(ids) - 1)
        block_tables[row, : len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.int32)
    pad_tokens, pad_seqs = num_tokens - len(ids), num_seqs - len(work)
    ids += [0] * pad_tokens
    positions += [0] * pad_tokens
    slots += [PAD_SLOT] * pad_tokens
    query_lens += [0] * pad_seqs
    seq_lens += [0] * pad_seqs
    logits_indices += [0] * pad_seqs
    inputs = {
        "input_ids": torch.tensor(ids, dtype=torch.int64),
        "positions": torch.tensor(positions, dtype=torch.int64),
        "slot_mapping": torch.tensor(slots, dtype=torch.int64),
        "query_lens": torch.tensor(query_lens, dtype=torch.int32),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
        "block_tables": block_tables,
        "logits_indices": torch.tensor(logits_indices, dtype=torch.int64),
    }
    return {name: t.to(device) for name, t in inputs.items()}
