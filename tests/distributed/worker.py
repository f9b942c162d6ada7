"""A torchrun worker for the tensor-parallel tests: one launch checks many artifacts.

    python -m torch.distributed.run --nproc-per-node 2 --master-port PORT tests/distributed/worker.py \
        JOBS.json OUT_DIR [--exit-after-load RANK]

JOBS.json: ``{"artifacts": {name: path}, "prompts": [[ids...]], "max_new_tokens": N}``. Every rank loads
each artifact with ``xllm_compiler.load`` (the first load joins the process group), runs ``logits()``
and greedy ``generate()`` (eos ignored) on the prompts, and writes ``OUT_DIR/rank<r>.json``:
``{"rank", "world_size", "results": {name: {"logits", "tokens", "graphs"}}}`` (``graphs``: the graphs
the run used). Rank 0's file is the answer; the others let a test check that the ranks agree.

On an error a rank writes ``{"rank", "error": {"type", "message"}}`` instead and exits 1.
``--exit-after-load RANK`` makes that rank leave with ``os._exit(0)`` once everything is loaded,
before any step runs: a rank that vanishes mid-run. Exit status 0, so that torchrun does not tear the
other ranks down itself: they must notice on their own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


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
        import xllm_compiler

        jobs = json.loads(args.jobs.read_text())
        models = {name: xllm_compiler.load(path) for name, path in jobs["artifacts"].items()}
        if args.exit_after_load == rank:
            sys.stdout.flush()
            os._exit(0)
        if args.stall_after_load == rank:
            time.sleep(600)
        results = {}
        for name, model in models.items():
            logits = model.logits(jobs["prompts"])
            tokens = model.generate(jobs["prompts"], max_new_tokens=jobs["max_new_tokens"], ignore_eos=True)
            results[name] = {"logits": logits.tolist(), "tokens": tokens, "graphs": model.engine.graphs.resident()}
        group = next(iter(models.values())).engine.group if models else None
        report = {
            "rank": group.rank if group else rank,
            "world_size": group.size if group else 1,
            "seconds": round(time.monotonic() - start, 3),
            "results": results,
        }
    except BaseException as exc:
        error = {"type": type(exc).__name__, "message": str(exc), "seconds": round(time.monotonic() - start, 3)}
        out_file.write_text(json.dumps({"rank": rank, "error": error}))
        raise
    out_file.write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
