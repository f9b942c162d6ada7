"""The step-level scheduler against whole-batch generate() on one request set, in-process (no HTTP).

    python tools/bench_engine.py [--model tiny|llama-100m] [--rate R] [--requests N] [--threads N] [--json PATH]

One seeded request set: Poisson arrivals at ``--rate`` per second, prompts of 16-256 random token ids, 8-64 new
tokens each (eos ignored). Two drivers replay it against the same loaded model:

  step-level   a StepScheduler (what xllm-serve runs): requests join between any two steps, finished ones leave.
  whole-batch  the calling pattern the runtime had before the step-level scheduler: generate() on every request
               that has arrived, and the ones arriving meanwhile wait for the whole call to finish (a batch
               runs until its longest request is done).

Figures per driver: throughput (generated tokens / wall seconds from the first arrival to the last finish), and
request latency (arrival -> last token) p50/p99. Time to first token is the step-level driver's only (a
whole-batch call hands its tokens back at the end).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from random_checkpoint import write_checkpoint  # noqa: E402

import xllm_compiler  # noqa: E402
from xllm_compiler.runtime.requests import Request, SamplingParams  # noqa: E402


def request_set(n: int, rate: float, vocab: int, seed: int) -> list[tuple[float, list[int], int]]:
    """(arrival seconds, prompt, max_new_tokens) per request."""
    rng = random.Random(seed)
    arrival, requests = 0.0, []
    for _ in range(n):
        arrival += rng.expovariate(rate)
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(16, 256))]
        requests.append((arrival, prompt, rng.randint(8, 64)))
    return requests


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def step_level(model, requests) -> dict:
    scheduler = model.make_scheduler()
    start = time.perf_counter()
    pending = list(enumerate(requests))
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    tokens = 0
    while pending or scheduler.has_work():
        now = time.perf_counter() - start
        while pending and pending[0][1][0] <= now:
            i, (_, prompt, new) = pending.pop(0)
            scheduler.add(Request(str(i), prompt, SamplingParams(max_new_tokens=new, ignore_eos=True)))
        if not scheduler.has_work():
            time.sleep(max(0.0, pending[0][1][0] - now))
            continue
        for out in scheduler.step():
            at = time.perf_counter() - start
            if out.new_tokens:
                tokens += len(out.new_tokens)
                first.setdefault(out.request_id, at)
            if out.finished:
                done[out.request_id] = at
    latency = [done[str(i)] - r[0] for i, r in enumerate(requests)]
    ttft = [first[str(i)] - r[0] for i, r in enumerate(requests)]
    return _figures(tokens, max(done.values()) - requests[0][0], latency, ttft)


def whole_batch(model, requests) -> dict:
    start = time.perf_counter()
    pending = list(requests)
    latency, tokens = [], 0
    while pending:
        now = time.perf_counter() - start
        if pending[0][0] > now:
            time.sleep(pending[0][0] - now)
            now = pending[0][0]
        batch = [r for r in pending if r[0] <= now]
        pending = pending[len(batch) :]
        outputs = model.generate([p for _, p, _ in batch], max_new_tokens=max(n for *_, n in batch), ignore_eos=True)
        end = time.perf_counter() - start
        for (arrival, _, new), out in zip(batch, outputs, strict=True):
            tokens += min(new, len(out))  # a request wanted `new` tokens; the batch ran to its longest
            latency.append(end - arrival)
    return _figures(tokens, end - requests[0][0], latency, None)


def _figures(tokens: int, wall: float, latency: list[float], ttft: list[float] | None) -> dict:
    figures = {
        "tok_s": round(tokens / wall, 1),
        "latency_p50_s": round(percentile(latency, 0.5), 3),
        "latency_p99_s": round(percentile(latency, 0.99), 3),
    }
    if ttft is not None:
        figures |= {
            "ttft_p50_ms": round(1000 * percentile(ttft, 0.5), 1),
            "ttft_p99_ms": round(1000 * percentile(ttft, 0.99), 1),
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("tiny", "llama-100m"), default="tiny")
    parser.add_argument("--rate", type=float, default=8.0)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = ROOT / "tools" / "tiny-llama"
        if args.model == "llama-100m":
            model_dir = write_checkpoint(Path(tmp) / "ckpt", "llama-100m", torch.float32)
        xllm_compiler.compile(model_dir, Path(tmp) / "artifact", dtype="float32", max_seq_len=512)
        model = xllm_compiler.load(Path(tmp) / "artifact")
        requests = request_set(args.requests, args.rate, model.vocab_size, args.seed)
        model.generate([[5] * 40, [7] * 300], max_new_tokens=2)  # build the graphs the first steps need
        rows = {"step-level": step_level(model, requests), "whole-batch": whole_batch(model, requests)}
    for name, figures in rows.items():
        print(name, " ".join(f"{k}={v}" for k, v in figures.items()))
    print(
        f"throughput ratio step-level / whole-batch: {rows['step-level']['tok_s'] / rows['whole-batch']['tok_s']:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
