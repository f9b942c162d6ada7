"""Prompt-lookup proposals for speculative decoding: continue the text the way it went the last time.

Text an LLM writes often repeats what it has seen (code being edited, quoted passages, lists, loops of a small
model): when the last ``n`` tokens of a sequence occurred before, the tokens that followed them then are a
cheap guess of what follows now. The longest ``n`` in ``[min_n, max_n]`` with a match wins, and of its matches
the most recent, whose continuation is the freshest. No model runs, so a proposal costs a few vector
comparisons over the sequence's history.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NgramProposer:
    """Proposes up to ``num_tokens`` tokens by matching the last ``min_n``..``max_n`` tokens earlier on."""

    num_tokens: int
    min_n: int = 1
    max_n: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {self.min_n} and {self.max_n}")
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1, got {self.num_tokens}")

    def propose(self, tokens: list[int], limit: int | None = None) -> list[int]:
        """Up to ``min(num_tokens, limit)`` proposed next tokens of ``tokens``; empty when nothing matches."""
        count = self.num_tokens if limit is None else min(self.num_tokens, limit)
        if count <= 0 or len(tokens) < self.min_n + 1:
            return []
        history = np.asarray(tokens, dtype=np.int64)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            start = _last_earlier_match(history, n)
            if start is not None:
                return history[start + n : start + n + count].tolist()
        return []


def _last_earlier_match(history: np.ndarray, n: int) -> int | None:
    """Start of the latest occurrence of the last ``n`` tokens that ends before them, or None."""
    pattern = history[-n:]
    windows = np.lib.stride_tricks.sliding_window_view(history[:-1], n)  # every window that has a successor
    hits = np.flatnonzero((windows == pattern).all(axis=1))
    return int(hits[-1]) if hits.size else None
