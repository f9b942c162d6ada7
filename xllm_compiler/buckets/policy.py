"""Which shapes get a specialised graph: decode batch sizes and prefill token counts, per phase.

A bucket fixes both step dims: ``num_tokens`` and ``num_seqs``. Decode runs one token per sequence,
so a decode bucket b is (b, b). A prefill bucket of t tokens takes up to ``min(t, max decode bucket)``
prompts at once: prompts prefilled together go on to decode together.

A verify bucket (speculative decoding) is decode-shaped: a verify step of s sequences with k proposals
each runs s·(k+1) rows of the decode graph, one per position checked. Each row is its own entry of the
per-sequence metadata, with its sequence's block table and the context up to and including itself: every
layer writes the K/V of all rows before it attends, so row i sees the proposals before it, which is the
causal mask within the chunk. Verify buckets therefore only add decode-graph sizes, for as many rows as
the decode buckets times (k+1); they are a phase of their own so that they do not count as decode batch
sizes (the prefill buckets' sequence counts and the scheduler's batch limit stay those of decode).
"""

from __future__ import annotations

from dataclasses import dataclass

from xllm_compiler.errors import OptionsError
from xllm_compiler.interface import NUM_SEQS, NUM_TOKENS

DECODE = "decode"
PREFILL = "prefill"
VERIFY = "verify"
#: Phases whose graphs have one query row per sequence entry (the decode attention's premise).
ONE_ROW_PER_SEQUENCE = (DECODE, VERIFY)


@dataclass(frozen=True, order=True)
class Bucket:
    """One specialised shape: ``num_tokens`` flattened tokens from at most ``num_seqs`` sequences."""

    phase: str
    num_tokens: int
    num_seqs: int

    @property
    def name(self) -> str:
        return f"{self.phase}_{self.num_tokens}"

    def sizes(self) -> dict[str, int]:
        return {NUM_TOKENS: self.num_tokens, NUM_SEQS: self.num_seqs}

    def to_json(self) -> dict:
        return {"phase": self.phase, "num_tokens": self.num_tokens, "num_seqs": self.num_seqs}


def make_buckets(
    decode_sizes: tuple[int, ...],
    prefill_sizes: tuple[int, ...],
    max_seq_len: int,
    explicit_prefill: bool,
    num_speculative_tokens: int = 0,
) -> list[Bucket]:
    """Decode, prefill and (with ``num_speculative_tokens`` k > 0) verify buckets; prefill sizes above
    max_seq_len are refused if asked for, else dropped. Verify sizes are b·(k+1) for each decode size b,
    less those a decode bucket already has (a verify step runs on either)."""
    too_long = [t for t in prefill_sizes if t > max_seq_len]
    if too_long and explicit_prefill:
        raise OptionsError(f"prefill bucket {too_long[0]} exceeds max_seq_len {max_seq_len}")
    prefill_sizes = tuple(t for t in prefill_sizes if t <= max_seq_len) or (max_seq_len,)
    max_batch = max(decode_sizes)
    verify_sizes = sorted({b * (num_speculative_tokens + 1) for b in decode_sizes} - set(decode_sizes))
    return (
        [Bucket(DECODE, b, b) for b in decode_sizes]
        + [Bucket(PREFILL, t, min(t, max_batch)) for t in prefill_sizes]
        + [Bucket(VERIFY, n, n) for n in (verify_sizes if num_speculative_tokens else [])]
    )
