"""Speculative decoding against plain decoding, same artifact, prompts and threads, in one run.

    python tools/bench_speculative.py [--workloads tiny,random,draft] [--batches 1,4] [-k 3] [--new-tokens 128]
                                      [--runs 3] [--threads N] [--json PATH]

Workloads:
  tiny    the bundled tools/tiny-llama (float32), prompts cut from its corpus.txt; n-gram proposals.
  random  a random ~100M Llama (tools/random_checkpoint.py, float32), random token-id prompts; n-gram proposals
          (they rarely hit: this measures what speculation costs when it cannot help).
  draft   the same ~100M target, drafted by a 2-layer model of its shapes (tools/random_checkpoint.py draws the
          same embedding and first two layers, and another LM head): random weights on both sides, so acceptance
          is low; this measures the mechanism and its cost, not what a trained draft gains.

Each figure is the median of --runs timed generate() calls (after a warm-up one that builds every graph) of
--new-tokens tokens per prompt, eos ignored: tokens/s = batch x new tokens / seconds. The outputs of the two
modes are compared token for token (greedy), and the speculative run's m.stats()["speculative"] is printed:
proposed and accepted tokens, acceptance rate, mean tokens per verify step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from random_checkpoint import write_checkpoint  # noqa: E402

import xllm_compiler  # noqa: E402

PROMPT_TOKENS = 64


def _prompts_from_corpus(model: xllm_compiler.CompiledModel, batch: int) -> list[list[int]]:
    ids = model.encode((ROOT / "tools" / "tiny-llama" / "corpus.txt").read_text())
    step = max(1, (len(ids) - PROMPT_TOKENS) // max(batch, 1))
    return [ids[i * step : i * step + PROMPT_TOKENS] for i in range(batch)]


def _random_prompts(vocab: int, batch: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (batch, PROMPT_TOKENS), generator=generator).tolist()


def _timed(fn, runs: int) -> tuple[float, object]:
    result = fn()  # warm-up: builds the graphs this workload needs
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _compare(name, target, prompts, new_tokens, runs, k, speculative) -> dict:
    plain_s, plain = _timed(lambda: target.generate(prompts, new_tokens, ignore_eos=True), runs)
    before = target.stats()["speculative"]
    spec_s, spec = _timed(
        lambda: target.generate(
            prompts, new_tokens, ignore_eos=True, speculative=speculative, num_speculative_tokens=k
        ),
        runs,
    )
    after = target.stats()["speculative"]
    proposed, accepted = after["proposed"] - before["proposed"], after["accepted"] - before["accepted"]
    steps = after["verify_steps"] - before["verify_steps"]
    tokens = len(prompts) * new_tokens
    return {
        "workload": name,
        "batch": len(prompts),
        "k": k,
        "plain_tok_s": round(tokens / plain_s, 1),
        "speculative_tok_s": round(tokens / spec_s, 1),
        "speedup": round(plain_s / spec_s, 3),
        "identical": plain == spec,
        "acceptance_rate": round(accepted / proposed, 3) if proposed else 0.0,
        "verify_steps_per_call": round(steps / (runs + 1), 1),
    }


def _compile(model_dir: Path, out: Path, k: int) -> xllm_compiler.CompiledModel:
    xllm_compiler.compile(model_dir, out, dtype="float32", num_speculative_tokens=k, max_seq_len=1024, cache_dir="")
    return xllm_compiler.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="tiny,random,draft")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workloads = args.workloads.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    k = args.num_speculative_tokens
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "tiny" in workloads:
            tiny = _compile(ROOT / "tools" / "tiny-llama", tmp / "tiny", k)
            for batch in batches:
                rows.append(
                    _compare("tiny", tiny, _prompts_from_corpus(tiny, batch), args.new_tokens, args.runs, k, "ngram")
                )
        if "random" in workloads or "draft" in workloads:
            write_checkpoint(tmp / "llama-100m", "llama-100m", torch.float32)
            target = _compile(tmp / "llama-100m", tmp / "target", k)
            prompts = {b: _random_prompts(target.vocab_size, b) for b in batches}
            if "random" in workloads:
                for batch in batches:
                    rows.append(_compare("random", target, prompts[batch], args.new_tokens, args.runs, k, "ngram"))
            if "draft" in workloads:
                write_checkpoint(tmp / "draft-2l", "llama-100m", torch.float32, num_hidden_layers=2)
                draft = _compile(tmp / "draft-2l", tmp / "draft", 0)
                for batch in batches:
                    rows.append(_compare("draft", target, prompts[batch], args.new_tokens, args.runs, k, draft))
    header = list(rows[0]) if rows else []
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[h]) for h in header))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
