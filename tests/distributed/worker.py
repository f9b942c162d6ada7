"""A torchrun worker for the tensor-parallel tests: one launch checks many artifacts.

    python -m torch.distributed.run --nproc-per-node 2 --master-port PORT tests/distributed/worker.py \
        JOBS.json OUT_DIR [--exit-after-load RANK | --stall-after-load RANK]

JOBS.json: ``{"artifacts": {name: path}, "prompts": [[ids...]], "max_new_tokens": N, "sample_seed": S,
"xllm_run": [argv...] (optional)}``.

Every rank loads each artifact with ``xllm_compiler.load`` (the first load joins the process group),
runs ``logits()``, greedy ``generate()`` and ``generate(temperature=1.0, seed=S + 1000 * rank)`` (eos
ignored) on the prompts, and writes ``OUT_DIR/rank<r>.json``: ``{"rank", "world_size", "seconds",
"results": {name: {"logits", "tokens", "sampled", "graphs", "expert_stats"}}}`` (``graphs``: those the run
used; ``expert_stats``: ``CompiledModel.expert_stats()`` after the three calls). Rank
0's file is the answer; the others let a test check that the ranks agree.

With ``xllm_run``, each rank then runs ``xllm_compiler.run.main(argv)`` (xllm-run in this process), then
the atexit handlers (what a normal exit would run before the interpreter shuts down), and records under
``"xllm_run"`` its exit code and whether the process group is still up: a group left up at shutdown
lets gloo's worker threads race the interpreter's finalisation (``terminate called without an active
exception``). The worker itself then tears the group down, so its own exit is clean.

On an error a rank writes ``{"rank", "error": {"type", "message", "seconds"}}`` instead and exits 1.
``--exit-after-load RANK`` makes that rank leave with ``os._exit(0)`` once everything is loaded, before
any step runs: a rank that vanishes mid-run. Exit status 0, so that torchrun does not tear the other
ranks down itself: they must notice on their own. ``--stall-after-load RANK`` makes it sleep instead:
a rank that hangs.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import time
from pathlib import Path


def greedy_with_whole_prompts(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy tokens through a scheduler whose step budget holds every prompt whole: prompts longer than every
    prefill bucket run on the dynamic fallback graph (generate() would prefill them in chunks)."""
    import torch

    from xllm_compiler.runtime.requests import Request, SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    scheduler = model.make_scheduler(max_num_batched_tokens=sum(map(len, prompts)))
    with torch.inference_mode():
        outputs = scheduler.run(Request(str(i), p, params) for i, p in enumerate(prompts))
    return [[t for out in outputs[str(i)] for t in out.new_tokens] for i in range(len(prompts))]


def run_jobs(jobs: dict, rank: int, exit_after_load: int | None, stall_after_load: int | None) -> dict:
    import torch.distributed as dist

    import xllm_compiler
    from xllm_compiler.run import main as xllm_run

    models = {name: xllm_compiler.load(path) for name, path in jobs["artifacts"].items()}
    if exit_after_load == rank:
        sys.stdout.flush()
        os._exit(0)
    if stall_after_load == rank:
        time.sleep(600)
    seed = jobs.get("sample_seed", 0) + 1000 * rank  # ranks sample apart: they must still keep rank 0's tokens
    results = {}
    for name, model in models.items():
        prompts, new_tokens = jobs["prompts"], jobs["max_new_tokens"]
        results[name] = {
            "logits": model.logits(prompts).tolist(),
            "tokens": model.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True),
            "sampled": model.generate(prompts, max_new_tokens=new_tokens, temperature=1.0, seed=seed, ignore_eos=True),
            "whole_prompts": greedy_with_whole_prompts(model, prompts, new_tokens),
            "graphs": model.engine.graphs.resident(),
            "expert_stats": model.expert_stats(),
        }
    report = {"results": results}
    if models:
        group = next(iter(models.values())).engine.group
        report.update(rank=group.rank, world_size=group.size)
    if "xllm_run" in jobs:
        code = xllm_run(jobs["xllm_run"])
        sys.stdout.flush()
        atexit._run_exitfuncs()
        report["xllm_run"] = {"code": code, "process_group_up_at_exit": dist.is_initialized()}
    if dist.is_initialized():
        dist.destroy_process_group()
    return report


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("jobs", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--exit-after-load", type=int, metavar="RANK")
    parser.add_argument("--stall-after-load", type=int, metavar="RANK")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    out_file = args.out / f"rank{rank}.json"
    start = time.monotonic()
    try:
        jobs = json.loads(args.jobs.read_text())
        report = run_jobs(jobs, rank, args.exit_after_load, args.stall_after_load)
    except BaseException as exc:
        error = {"type": type(exc).__name__, "message": str(exc), "seconds": round(time.monotonic() - start, 3)}
        out_file.write_text(json.dumps({"rank": rank, "error": error}))
        raise
    report["seconds"] = round(time.monotonic() - start, 3)
    out_file.write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
