"""Which shapes get a specialised graph: decode batch sizes and prefill token counts, per phase.

A bucket fixes both step dims: ``num_tokens`` and ``num_seqs``. Decode runs one token per sequence,
so a decode bucket b is (b, b). A prefill bucket of t tokens takes up to ``min(t, max decode bucket)``
prompts at once: prompts prefilled together go on to decode together.
"""

from __future__ import annotations

from dataclasses import dataclass

from xllm_compiler.errors import OptionsError
from xllm_compiler.interface import NUM_SEQS, NUM_TOKENS

DECODE = "decode"
PREFILL = "prefill"


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
    decode_sizes: tuple[int, ...], prefill_sizes: tuple[int, ...], max_seq_len: int, explicit_prefill: bool
) -> list[Bucket]:
    """Decode and prefill buckets; prefill sizes above max_seq_len are refused if asked for, else dropped."""
    too_long = [t for t in prefill_sizes if t > max_seq_len]
    if too_long and explicit_prefill:
        raise OptionsError(f"prefill bucket {too_long[0]} exceeds max_seq_len {max_seq_len}")
    prefill_sizes = tuple(t for t in prefill_sizes if t <= max_seq_len) or (max_seq_len,)
    max_batch = max(decode_sizes)
    return [Bucket(DECODE, b, b) for b in decode_sizes] + [Bucket(PREFILL, t, min(t, max_batch)) for t in prefill_sizes]
