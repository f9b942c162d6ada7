"""Buckets chosen from traffic: k sizes per phase that minimise the expected padded tokens of a trace.

A trace is JSON lines of observed step shapes: ``{"phase": "prefill", "num_tokens": 183}`` or
``{"phase": "decode", "batch_size": 6}`` (``prompt_len`` and ``num_tokens`` are synonyms for prefill).
Each step runs on the smallest bucket that holds it, padding up to it; steps larger than every bucket
run on the fallback graph unpadded. Choosing buckets is then a 1-D optimal partition of the sorted
observed sizes: the best buckets sit at observed sizes, and the k-th of them closes a group of
consecutive sizes, so dynamic programming over (sizes covered, buckets used) finds the optimum in
O(k n^2) for n distinct sizes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from xllm_compiler.buckets.policy import DECODE, PREFILL
from xllm_compiler.errors import OptionsError

SIZE_KEYS = {PREFILL: ("num_tokens", "prompt_len"), DECODE: ("batch_size", "num_seqs", "num_tokens")}


@dataclass(frozen=True)
class Trace:
    """Observed step sizes per phase, as size -> count."""

    sizes: dict[str, Counter]

    def total(self, phase: str) -> int:
        return sum(size * count for size, count in self.sizes[phase].items())


def read_trace(path: Path) -> Trace:
    """Parse a JSONL trace, naming the line of any malformed record."""
    sizes: dict[str, Counter] = {PREFILL: Counter(), DECODE: Counter()}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise OptionsError(f"cannot read trace {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            phase = record.get("phase") or (DECODE if "batch_size" in record else PREFILL)
            key = next(k for k in SIZE_KEYS[phase] if k in record)
            size = record[key]
        except (json.JSONDecodeError, AttributeError, KeyError, StopIteration):
            raise OptionsError(f"{path}:{number}: expected a JSON object with a phase and a size") from None
        count = record.get("count", 1)
        for what, value in (("size", size), ("count", count)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionsError(f"{path}:{number}: {what} {value!r} is not a positive integer")
        sizes[phase][size] += count
    if not any(sizes.values()):
        raise OptionsError(f"trace {path} has no steps")
    return Trace(sizes)


def padded_tokens(counts: Counter, buckets: list[int]) -> int:
    """Padding the trace costs with these buckets (steps above the largest bucket are not padded)."""
    ordered = sorted(buckets)
    total = 0
    for size, count in counts.items():
        fit = next((b for b in ordered if b >= size), None)
        if fit is not None:
            total += (fit - size) * count
    return total


def best_buckets(counts: Counter, k: int, limit: int | None = None) -> list[int]:
    """The k bucket sizes (at most) minimising padded tokens for ``counts``; sizes above ``limit`` are
    left to the fallback. The largest bucket always covers the largest size within the limit."""
    sizes = sorted(s for s in counts if limit is None or s <= limit)
    if not sizes or k < 1:
        return []
    n = len(sizes)
    weights = [counts[s] for s in sizes]
    prefix_count = [0]
    prefix_tokens = [0]
    for s, w in zip(sizes, weights, strict=True):
        prefix_count.append(prefix_count[-1] + w)
        prefix_tokens.append(prefix_tokens[-1] + s * w)

    def cost(i: int, j: int) -> int:
        """Padding of sizes[i..j] all run on a bucket of sizes[j]."""
        count = prefix_count[j + 1] - prefix_count[i]
        return sizes[j] * count - (prefix_tokens[j + 1] - prefix_tokens[i])

    inf = float("inf")
    k = min(k, n)
    # best[b][j]: least padding covering sizes[0..j] with b buckets, the last at sizes[j].
    best = [[inf] * n for _ in range(k + 1)]
    choice = [[-1] * n for _ in range(k + 1)]
    for j in range(n):
        best[1][j] = cost(0, j)
    for b in range(2, k + 1):
        for j in range(n):
            for i in range(b - 2, j):
                value = best[b - 1][i] + cost(i + 1, j)
                if value < best[b][j]:
                    best[b][j], choice[b][j] = value, i
    used = min(range(1, k + 1), key=lambda b: best[b][n - 1])
    buckets, j, b = [], n - 1, used
    while b >= 1 and j >= 0:
        buckets.append(sizes[j])
        j, b = choice[b][j], b - 1
    return sorted(buckets)


def padding_fraction(counts: Counter, buckets: list[int]) -> float:
    """Padded tokens as a fraction of real tokens."""
    real = sum(size * count for size, count in counts.items())
    return padded_tokens(counts, buckets) / real if real else 0.0
