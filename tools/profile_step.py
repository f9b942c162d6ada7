"""Where one step's time goes: GEMMs, attention, fused elementwise kernels, other ops, Python overhead.

    python tools/profile_step.py [--model-dir DIR] [--dtype float32|bfloat16] [--phase decode|prefill]
                                 [--batch B] [--tokens T] [--steps N]

Without --model-dir it compiles a random ~100M-parameter Llama (tools/random_checkpoint.py). A decode
step runs B sequences one token each after a 32-token prompt; a prefill step runs one T-token prompt.

Four timings, the first two without the profiler (it slows small ops down):
  step     the runtime's whole step: input building, the bucket graph, logits to float.
  graph    the bucket graph call alone.
  ops      torch.profiler over the graph calls: the time in each kind of op. Our fused kernels are
           labelled by wrapping each call (what the graph calls on CPU is a plain Python function or a
           C++ kernel, which the profiler cannot see into otherwise); the wrapper's own cost, about a
           microsecond a call, lands in "Python between ops", which is graph minus everything timed.
  program  where the kernels are built, a second load of the artifact as the runtime runs it (the
           native replay program, runtime/cpu_replay.py), each of its calls timed by the program itself
           (ReplayProgram.set_timing): no wrapper or profiler between them, the caches as a real step
           leaves them. What a decode step's small calls cost after the weights' stream.

The breakdown in docs/performance.md comes from this script.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile, record_function

import xllm_compiler
from xllm_compiler.ops import KERNELS
from xllm_compiler.ops.native import native_cpu_kernels, native_kernels
from xllm_compiler.runtime.step import Sequence

PROMPT = 32
GRAPH_LABEL = "xllm.graph"
GEMM_OPS = {"xllm::packed_linear", "xllm::packed_linear_out", "xllm::packed_linear_float"}
GEMM_OPS |= {"aten::linear", "aten::addmm", "aten::mm", "aten::matmul"}
#: xllm op -> the category its time goes to.
OP_CATEGORY = {
    "paged_attention": "attention (incl. KV-cache write)",
    "write_kv_cache": "attention (incl. KV-cache write)",
    "rms_norm": "norms, SwiGLU, rotary (fused)",
    "fused_add_rms_norm": "norms, SwiGLU, rotary (fused)",
    "silu_and_mul": "norms, SwiGLU, rotary (fused)",
    "rotary_embedding": "norms, SwiGLU, rotary (fused)",
    "all_reduce": "collectives",
    "all_reduce_add_rms_norm": "collectives",
}


def category(name: str) -> str:
    if name in GEMM_OPS:
        return "GEMM (linear layers)"
    if name.startswith("xllm::"):
        op = name.removeprefix("xllm::").removesuffix("_out")
        return OP_CATEGORY.get(op, "other xllm ops")
    if name in ("aten::copy_", "aten::clone", "aten::contiguous"):
        return "copies"
    return "other aten ops (views, index, embedding, ...)"


def labelled(fn, label: str):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    call.__module__ = __name__  # not the kernel's module: the replay program would call the kernel itself
    return call


def label_kernels(model) -> None:
    """Wrap every xllm kernel call in the (not yet built) bucket graphs in a profiler label."""
    names = {id(fn): name for name, fn in {**KERNELS, **native_cpu_kernels()}.items()}
    native = native_kernels()
    if native is not None:  # the packed linear layers the CPU platform put in
        for name in ("packed_linear", "packed_linear_out", "packed_linear_float"):
            names[id(getattr(native, name))] = f"xllm::{name}"
    for graph in model.engine.graphs._graphs.values():
        for node in graph.nodes:
            if node.op == "call_function" and id(node.target) in names:
                node.target = labelled(node.target, names[id(node.target)])


def make_step(model, phase: str, batch: int, tokens: int):
    """A callable running one step of ``phase``, and the sequences it advances (blocks reserved)."""
    engine = model.engine
    length = tokens if phase == "prefill" else PROMPT
    seqs = [Sequence(tokens=list(range(1, length + 1)), prompt_len=length) for _ in range(batch)]
    for seq in seqs:
        seq.blocks = engine.pool.allocate(engine.blocks_for(length + 512))
    if phase == "prefill":

        def step() -> None:
            for seq in seqs:
                seq.num_computed = 0
            engine.step("prefill", [(seq, length) for seq in seqs])

        return step
    engine.step("prefill", [(seq, length) for seq in seqs])
    for seq in seqs:
        seq.tokens.append(5)

    def step() -> None:
        engine.step("decode", [(seq, 1) for seq in seqs])
        for seq in seqs:
            seq.tokens.append(5)

    return step


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def graph_timer(model) -> list[float]:
    """Record the wall time of every bucket graph call into the returned list; label the calls."""
    times: list[float] = []
    runner = model.engine.graphs.runner  # what runs a bucket graph (on CPU, its replay: runtime/cpu_replay.py)

    def timed_runner(name: str):
        run = runner(name)

        def call(*args):
            start = time.perf_counter()
            with record_function(GRAPH_LABEL):
                out = run(*args)
            times.append(time.perf_counter() - start)
            return out

        return call

    model.engine.graphs.runner = timed_runner
    return times


def program_profile(artifact: Path, phase: str, batch: int, tokens: int, runs: int) -> tuple[dict, float] | None:
    """({the graph's call: (calls a step, ms a step)}, the program's ms a step), timed inside the native replay
    program of the bucket graph a step of ``phase`` runs on; None where the graph has no such program."""
    model = xllm_compiler.load(artifact)
    with torch.inference_mode():
        step = make_step(model, phase, batch, tokens)
        for _ in range(3):
            step()
        num_tokens = batch if phase == "decode" else tokens
        runner = model.engine.graphs.runner(model.engine.graphs.choose(phase, num_tokens, batch).graph)
        program = getattr(runner, "program", None)
        if program is None:
            return None
        program.set_timing(True)
        for _ in range(runs):
            step()
        times = program.entry_times()
        program.set_timing(False)
    kinds: dict[str, tuple[int, float]] = {}
    for call, ns in zip(runner.calls, times, strict=True):
        name = getattr(call.target, "__name__", str(call.target))
        count, ms = kinds.get(name, (0, 0.0))
        kinds[name] = (count + 1, ms + ns / 1e6 / runs)
    return kinds, sum(times) / 1e6 / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="checkpoint (default: random llama-100m)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--phase", default="decode", choices=["decode", "prefill"])
    parser.add_argument("--batch", type=int, default=1, help="decode sequences per step")
    parser.add_argument("--tokens", type=int, default=512, help="prefill prompt length")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    args = parser.parse_args()
    console = Console()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="xllm-profile-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from random_checkpoint import write_checkpoint

            model_dir = str(write_checkpoint(Path(tmp) / "model", dtype=getattr(torch, args.dtype)))
        batch = 1 if args.phase == "prefill" else args.batch
        buckets = dict(decode_buckets=[batch], prefill_buckets=sorted({PROMPT, args.tokens}))
        artifact = Path(tmp) / "artifact"
        xllm_compiler.compile(model_dir, artifact, dtype=args.dtype, max_seq_len=1024, cache_dir="", **buckets)
        model = xllm_compiler.load(artifact)
        label_kernels(model)
        graph_times = graph_timer(model)
        with torch.inference_mode():
            step = make_step(model, args.phase, batch, args.tokens)
            runs = args.steps if args.phase == "decode" else max(3, args.steps // 10)
            for _ in range(3):
                step()
            graph_times.clear()
            step_ms = median_ms(step, runs)
            graph_ms = statistics.median(graph_times) * 1e3
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(runs):
                    step()
        program = program_profile(artifact, args.phase, batch, args.tokens, runs)
    report(console, args, batch, step_ms, graph_ms, prof, runs)
    if program is not None:
        report_program(console, *program)


def report(console: Console, args, batch: int, step_ms: float, graph_ms: float, prof, runs: int) -> None:
    """Attribute the ops called directly by the graph (their time includes their children's) to categories."""
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.cpu_parent is not None and event.cpu_parent.name == GRAPH_LABEL:
            kind = category(event.name)
            totals[kind] = totals.get(kind, 0.0) + event.cpu_time_total / 1e3 / runs
    timed = sum(totals.values())
    shape = f"batch {batch}" if args.phase == "decode" else f"{args.tokens} tokens"
    table = Table(title=f"{args.phase} step, {shape}, {args.dtype}, {torch.get_num_threads()} threads")
    table.add_column("where")
    table.add_column("ms/step", justify="right")
    table.add_column("share", justify="right")
    rows = sorted(totals.items(), key=lambda item: -item[1])
    rows.append(("Python between ops in the graph", max(graph_ms - timed, 0.0)))
    rows.append(("outside the graph (inputs, logits)", max(step_ms - graph_ms, 0.0)))
    for name, ms in rows:
        table.add_row(name, f"{ms:.2f}", f"{ms / step_ms:.0%}")
    table.add_row("step", f"{step_ms:.2f}", "100%", style="bold")
    console.print(table)
    if args.phase == "decode":
        console.print(f"{batch * 1e3 / step_ms:.1f} tokens/s")


def report_program(console: Console, kinds: dict[str, tuple[int, float]], program_ms: float) -> None:
    table = Table(title="inside the native replay program (a second load, no profiler)")
    table.add_column("the graph's call")
    table.add_column("calls", justify="right")
    table.add_column("ms/step", justify="right")
    table.add_column("share", justify="right")
    for name, (count, ms) in sorted(kinds.items(), key=lambda item: -item[1][1]):
        table.add_row(name, str(count), f"{ms:.3f}", f"{ms / program_ms:.0%}")
    table.add_row("program", "", f"{program_ms:.3f}", "100%", style="bold")
    console.print(table)


if __name__ == "__main__":
    main()
