"""Count what one decode step executes, with the pass pipeline and without it, and time the passes.

    python tools/op_census.py MODEL_DIR [--dtype float32] [--batch 1]
    python tools/op_census.py --preset llama-100m [--layers 32]     (a random checkpoint, built on the fly)

For each of "all passes" and "--passes none" it compiles the model, prefills a prompt per sequence,
then counts over one decode step: graph nodes run (what the executor dispatches) and ATen kernels
executed (every aten op the CPU runs, inside our xllm:: kernels too, via a TorchDispatchMode). It also
prints the pass pipeline's time from the compile report.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import xllm_compiler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_checkpoint import write_checkpoint


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.namespace)] += 1
        return func(*args, **(kwargs or {}))


def census(model_dir: Path, out: Path, dtype: str, batch: int, passes: str | None) -> dict:
    options = dict(dtype=dtype, decode_buckets=[1, 2, 4, 8, 16, 32], prefill_buckets=[32], max_seq_len=256)
    if passes is not None:
        options["passes"] = passes
    report = xllm_compiler.compile(model_dir, out, **options)
    model = xllm_compiler.load(out)
    engine = model.engine
    from xllm_compiler.runtime.step import Sequence

    seqs = [Sequence(tokens=[1, 5, 9, 13], prompt_len=4, max_new_tokens=4) for _ in range(batch)]
    for seq in seqs:
        seq.blocks = engine.pool.allocate(1)
    engine.step("prefill", [(s, 4) for s in seqs])
    for seq in seqs:
        seq.tokens.append(7)
    graph = engine.graphs.module(engine.graphs.choose("decode", batch, batch).graph)
    nodes = sum(1 for n in graph.graph.nodes if n.op == "call_function")
    counter = OpCounter()
    with counter, torch.inference_mode():
        engine.step("decode", [(s, 1) for s in seqs])
    return {
        "graph_nodes": nodes,
        "aten_ops": counter.ops["aten"],
        "xllm_ops": counter.ops["xllm"],
        "pass_seconds": sum(p["seconds"] for p in report["passes"]),
        "nodes_captured": report["graph"]["nodes_captured"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", type=Path)
    parser.add_argument("--preset", help="build a random checkpoint instead (see tools/random_checkpoint.py)")
    parser.add_argument("--layers", type=int, help="with --preset: number of layers")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            overrides = {"num_hidden_layers": args.layers} if args.layers else {}
            model_dir = write_checkpoint(Path(tmp) / "model", args.preset or "llama-100m", torch.float32, **overrides)
        rows = {
            "all passes": census(model_dir, Path(tmp) / "fused", args.dtype, args.batch, None),
            "no passes": census(model_dir, Path(tmp) / "plain", args.dtype, args.batch, "none"),
        }
    print(f"{model_dir} ({args.dtype}, decode batch {args.batch})")
    print(f"{'':12} {'graph nodes':>12} {'aten ops/step':>14} {'xllm ops/step':>14} {'pass seconds':>13}")
    for name, row in rows.items():
        counts = f"{row['graph_nodes']:>12} {row['aten_ops']:>14} {row['xllm_ops']:>14}"
        print(f"{name:12} {counts} {row['pass_seconds']:>13.3f}")


if __name__ == "__main__":
    main()
