"""Write a synthetic serving trace (JSON lines of step shapes) for --buckets-from, and compare buckets.

    python tools/make_trace.py TRACE.jsonl [--requests 2000] [--seed 0]
    python tools/make_trace.py TRACE.jsonl --compare [--k 5] [--max-seq-len 2048]

The trace comes from a small simulation of continuous batching: requests arrive as a Poisson process,
prompt lengths are log-normal (median about 180 tokens, long tail, capped at --max-prompt), output
lengths log-normal (median about 90); every step decodes all running sequences (at most --max-batch)
and every admitted request adds one prefill step of its prompt. Each line is one step:
{"phase": "prefill", "num_tokens": 183} or {"phase": "decode", "batch_size": 6}.

--compare prints, per phase, the expected padding of k buckets chosen from the trace (what
xllm-compile --buckets-from does) against the default geometric series with the same k, and the share
of steps either leaves to the unpadded fallback graph (a default series cut short by a small k leaves
the long prompts there, which padding alone would count as free).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from xllm_compiler.buckets.policy import DECODE, PREFILL
from xllm_compiler.buckets.traffic import best_buckets, padding_fraction, read_trace
from xllm_compiler.options import DEFAULT_DECODE_BUCKETS, DEFAULT_PREFILL_BUCKETS


def simulate(requests: int, seed: int, max_prompt: int, max_batch: int, arrivals_per_step: float) -> list[dict]:
    rng = random.Random(seed)
    steps: list[dict] = []
    waiting = [
        (
            min(max_prompt, max(1, int(rng.lognormvariate(math.log(180), 0.9)))),
            max(1, int(rng.lognormvariate(math.log(90), 0.8))),
        )
        for _ in range(requests)
    ]
    running: list[int] = []
    clock = 0.0
    while waiting or running:
        clock += rng.expovariate(1.0)
        while waiting and len(running) < max_batch and rng.random() < arrivals_per_step:
            prompt, output = waiting.pop()
            steps.append({"phase": PREFILL, "num_tokens": prompt})
            running.append(output)
        if running:
            steps.append({"phase": DECODE, "batch_size": len(running)})
            running = [left - 1 for left in running if left > 1]
    return steps


def compare(path: Path, k: int | None, max_seq_len: int) -> None:
    trace = read_trace(path)
    defaults = {DECODE: list(DEFAULT_DECODE_BUCKETS), PREFILL: [s for s in DEFAULT_PREFILL_BUCKETS if s <= max_seq_len]}
    for phase in (DECODE, PREFILL):
        counts = trace.sizes[phase]
        count = k or len(defaults[phase])
        default = defaults[phase][:count]
        chosen = best_buckets(counts, count, limit=max_seq_len if phase == PREFILL else None)
        ours, theirs = padding_fraction(counts, chosen), padding_fraction(counts, default)
        ratio = theirs / ours if ours else float("inf")
        steps = sum(counts.values())
        print(f"{phase:8} steps {steps:6}  default {default}: padding {theirs:6.1%}" + fallback_note(counts, default))
        print(f"{'':21} from trace {chosen}: padding {ours:6.1%}  ({ratio:.1f}x less)" + fallback_note(counts, chosen))


def fallback_note(counts, buckets: list[int]) -> str:
    """Steps above the largest bucket run unpadded on the fallback graph: padding alone would call them free."""
    steps = sum(counts.values())
    above = sum(count for size, count in counts.items() if not buckets or size > max(buckets))
    return f", {above / steps:.1%} of steps on the fallback" if above else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--arrivals", type=float, default=0.15, help="chance of an arrival per step")
    parser.add_argument("--compare", action="store_true", help="compare buckets for an existing trace")
    parser.add_argument("--k", type=int, help="buckets per phase for --compare (default: the default series' count)")
    parser.add_argument("--max-seq-len", type=int, default=512)
    args = parser.parse_args()
    if args.compare:
        compare(args.trace, args.k, args.max_seq_len)
        return
    steps = simulate(args.requests, args.seed, args.max_prompt, args.max_batch, args.arrivals)
    args.trace.write_text("".join(json.dumps(step) + "\n" for step in steps))
    print(f"wrote {args.trace}: {len(steps)} steps")


if __name__ == "__main__":
    main()
