"""Tensor parallelism on this machine: TP=2 against TP=1, and how much communication the overlap passes hide.

    python tools/tp_overlap.py [--model-dir DIR] [--dtype float32|bfloat16] [--steps N]

Without --model-dir it uses a random ~100M-parameter Llama (tools/random_checkpoint.py). It compiles
three artifacts: TP=1; TP=2 with the default passes; TP=2 with the overlap passes off
(split_micro_batches, reorder_collectives, fuse_all_reduce_add_rms_norm). It times a prefill of 512
tokens and a decode step of batch 8 on TP=1 in this process (all threads), then on each TP=2 artifact
under ``torchrun --nproc-per-node 2`` (one thread per rank, gloo).

Communication cost is read with torch.profiler on rank 0: the time a step spends blocked in
``wait_tensor``, i.e. the all-reduce time no compute covered. With the overlap passes off every
collective is waited on right after it is issued, so that time is the whole communication; with them
on it is what stays exposed. hidden = 1 - exposed(on) / exposed(off).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import make_step, median_ms

import xllm_compiler

OVERLAP_PASSES = ("split_micro_batches", "reorder_collectives", "fuse_all_reduce_add_rms_norm")
#: (label, phase, batch, tokens)
CASES = (("prefill 512", "prefill", 1, 512), ("decode bs8", "decode", 8, 1))
WAIT_OP = "_c10d_functional::wait_tensor"


def measure(artifact: str, steps: int) -> dict[str, dict[str, float]]:
    """Per case: median step ms, and ms per step blocked in collective waits (profiled)."""
    model = xllm_compiler.load(artifact)
    results = {}
    with torch.inference_mode():
        for label, phase, batch, tokens in CASES:
            step = make_step(model, phase, batch, tokens)
            runs = steps if phase == "decode" else max(3, steps // 5)
            for _ in range(3):
                step()
            step_ms = median_ms(step, runs)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(runs):
                    step()
            waits = [e for e in prof.events() if e.name == WAIT_OP]
            results[label] = {
                "step_ms": step_ms,
                "wait_ms": sum(e.cpu_time_total for e in waits) / 1e3 / runs,
                "waits": len(waits) / runs,
            }
    return results


def worker(artifact: str, steps: int, out: str) -> None:
    results = measure(artifact, steps)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(results))


def run_tp2(artifact: Path, steps: int, work: Path) -> dict:
    out = work / f"{artifact.name}.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
        __file__, "--worker", str(artifact), "--steps", str(steps), "--out", str(out),
    ]  # fmt: skip
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="checkpoint (default: random llama-100m)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps (prefill: a fifth)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.out)
        return
    with tempfile.TemporaryDirectory(prefix="xllm-tp-") as tmp:
        work = Path(tmp)
        model_dir = args.model_dir
        if model_dir is None:
            from random_checkpoint import write_checkpoint

            model_dir = str(write_checkpoint(work / "model", dtype=getattr(torch, args.dtype)))
        options = dict(dtype=args.dtype, decode_buckets=[8], prefill_buckets=[32, 512], max_seq_len=1024, cache_dir="")
        artifacts = {"tp1": work / "tp1", "tp2 overlap on": work / "tp2_on", "tp2 overlap off": work / "tp2_off"}
        xllm_compiler.compile(model_dir, artifacts["tp1"], **options)
        xllm_compiler.compile(model_dir, artifacts["tp2 overlap on"], tp=2, **options)
        xllm_compiler.compile(model_dir, artifacts["tp2 overlap off"], tp=2, disable_passes=OVERLAP_PASSES, **options)
        results = {"tp1": measure(str(artifacts["tp1"]), args.steps)}
        for name in ("tp2 overlap on", "tp2 overlap off"):
            results[name] = run_tp2(artifacts[name], args.steps, work)
    print(f"{args.dtype}, TP=1 with {torch.get_num_threads()} threads; TP=2: 2 ranks x 1 thread (gloo)")
    for label, *_ in CASES:
        base = results["tp1"][label]["step_ms"]
        on, off = results["tp2 overlap on"][label], results["tp2 overlap off"][label]
        hidden = 1 - on["wait_ms"] / off["wait_ms"] if off["wait_ms"] else float("nan")
        print(f"{label}: TP=1 {base:.1f} ms/step")
        for name, r in (("overlap on ", on), ("overlap off", off)):
            print(
                f"  TP=2 {name}: {r['step_ms']:.1f} ms/step ({base / r['step_ms']:.2f}x TP=1), "
                f"blocked in {r['waits']:.0f} collective waits {r['wait_ms']:.2f} ms/step"
            )
        print(f"  communication hidden by the overlap passes: {hidden:.0%}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
