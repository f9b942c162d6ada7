"""Benchmark the compiled model against transformers eager and torch.compile on CPU: compile, prefill, decode, RSS.

    python tools/bench.py [--quick] [--model-dir DIR | --preset NAME] [--dtype float32|bfloat16|both] [--threads N]
                          [--runs N] [--rounds N] [--systems hf_eager,torch_compile,xllm_compiler] [--json PATH]
                          [--plot PATH.png]
                          [--also-disable-pass NAME[,NAME...]]
                          [--quantize int8,int4|none]
                          [--llama-bench PATH [--llama-batched-bench PATH] [--llama-quant int8,int4|none]]

Without --model-dir it benchmarks a random ~100M-parameter Llama (tools/random_checkpoint.py, preset
llama-100m; --preset mixtral-100m: a Mixtral of 8 experts, top-2, ~110M in all; --preset deepseek: a
DeepSeek-V3 of ~96M, see PRESET_DEFAULTS for what it changes) written into a temporary folder. Every system
gets the same checkpoint, token-id prompts (seeded random ids) and thread count:

  hf_eager       transformers' model class for the checkpoint, eager generate() (dynamic KV cache, sdpa).
  torch_compile  the same model, generate(cache_implementation="static", compile_config=CompileConfig(
                 fullgraph=True, dynamic=False, mode="default")): transformers' documented compile path. It
                 compiles the decode step only (prefill runs eagerly) and only on CUDA-like devices unless
                 the config's _compile_all_devices is set, which this does. mode="reduce-overhead" means
                 CUDA graphs (nothing on CPU); inductor freezing is off: it crashes on the static-cache
                 kernel (index out of bounds) with torch 2.13.
  xllm_compiler  xllm_compiler.compile(decode_buckets=[1, 8, 32], prefill_buckets=[32, 512], max_seq_len=640,
                 cache_dir="") then load() and generate(ignore_eos=True).
  xllm_compiler (no NAME)   with --also-disable-pass NAME: the same, compiled with disable_passes=[NAME] (e.g.
                 absorb_mla_weights: decode expands K/V from the latent like prefill), one more column.
  xllm_compiler  with --quantize W[,W]: also our artifact compiled with quantize=W (int8: per output channel;
                 int4: group 128, asymmetric), bfloat16 activations, each in a table of its own ("dtype" int8 or
                 int4), where llama.cpp's Q8_0 and Q4_0 rows land too.
  llama_cpp      with --llama-bench PATH: llama.cpp on the same weights, converted to GGUF by tools/gguf_convert.py
                 (float32 -> F32, bfloat16 -> BF16, and per --llama-quant, default int8,int4, Q8_0 and Q4_0 in
                 tables, and rows' dtype, int8 and int4, where our quantized artifacts belong), timed by
                 llama-bench (prefill, decode at batch 1) and llama-batched-bench (decode at batch 8 and 32; by
                 default the one next to llama-bench): see tools/llama_cpp_bench.py for how its figures map
                 onto ours. No compile_s or peak_rss_mb. A missing binary or a failed run is an error in its
                 cells; the rest still runs.
                 Building them (no GPU; ~25 minutes on 2 cores): the llama.cpp source ships in llama-cpp-python's
                 sdist, `pip download --no-deps --no-binary :all: llama-cpp-python`, unpack it, then in
                 vendor/llama.cpp: `cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build
                 --target llama-bench llama-batched-bench -j2`; the binaries land in build/bin/.

Figures, each the median, min and max of --runs runs (of every round's runs, with --rounds):
  compile_s         xllm_compiler: compile() wall time with the compile cache off (cache_dir="").
                    torch_compile: the first generate() (batch 1, 32-token prompt, 64 new tokens) in a fresh
                    process with an empty inductor cache dir. Every compile run is a fresh process.
  prefill_512_s     a 512-token prompt producing one token (generate, max_new_tokens=1), after a warm-up;
                    measured after the decode figures (see worker_measure for why the order matters).
  decode_bsB_tok_s  B prompts of 32 tokens: 63 * B / (time(64 new tokens) - time(1 new token)), eos ignored;
                    each run's 64-token time less the median of the runs' 1-token times.
  peak_rss_mb       in a process that loads only that system: peak RSS during a generate() of batch 8 x 64
                    tokens after a warm-up one (which compiles, for torch_compile); Linux's VmHWM reset just
                    before (else psutil, sampled every 5 ms); MB = 10**6 bytes.
The machine's read bandwidth (1 GB of float32 read by summing it, or as a matrix-vector product in our packed
linear kernel, whichever is faster: see read_bandwidth_gbs) gives the bandwidth-bound decode
limit at batch 1: weight bytes read per step (every linear incl. lm_head, norms, one embedding row; of an
MoE layer's experts only the top_k a token is routed to) / bandwidth. At batch B one read of the weights
serves B tokens, so decode figures are shown as a fraction of B x that limit (KV-cache reads are left out:
they are small at these lengths; for an MoE model B tokens read more experts than one does, so the fraction
understates it).

--rounds N measures every system and width N times over, round by round (ours, then llama.cpp, then again),
and pools each figure's runs: on a machine whose memory bandwidth drifts from minute to minute (a shared VM),
one round puts ours and the peer in different minutes, and a ratio of two batch-1 figures is then mostly the
drift. Compile times and peak RSS are taken in the first round only.

--json PATH writes a plain list of rows, one per figure: {"system", "dtype", "metric", "median", "min",
"max", "unit", "samples"}, plus "error" (with median, min and max null) when a figure could not be measured.
Machine facts (bandwidth, limits, threads) and the correctness check (greedy tokens of each system
against hf_eager), each system's speed-up over hf_eager (and ours over llama_cpp's, when it ran), for our
artifacts the KV cache bytes per token (and what expanded K/V would take, for MLA), and for llama_cpp its
GGUF files, build and commands are printed on the terminal only; the int8/int4 tables' limits count the bytes
of the GGUF file (gguf_convert.bytes_per_step). --quick: batches 1 and 8, two timed runs (one for RSS), one
compile run: under 10 minutes on 2 idle cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

SYSTEMS = ("hf_eager", "torch_compile", "xllm_compiler")
LLAMA_CPP = "llama_cpp"  # the optional peer (--llama-bench), run outside the workers
DTYPES = ("float32", "bfloat16")
QUANTIZED = ("int8", "int4")  # --quantize: our artifact with quantized linear weights, bfloat16 activations
#: Bytes a weight of a linear layer takes: int4 is 4 bits plus a float32 scale and offset per group of 128.
BYTES_PER_WEIGHT = {"float32": 4, "bfloat16": 2, "int8": 1, "int4": 0.5 + 8 / 128}
PROMPT_LEN, NEW_TOKENS, PREFILL_LEN = 32, 64, 512
RSS_BATCH = 8
WORKER_TIMEOUT_S = 3600
UNITS = {"compile_s": "s", "prefill_512_s": "s", "peak_rss_mb": "MB"}
#: What a preset changes when the command line leaves it unset (DeepSeek: bfloat16, eager transformers, and our
#: artifact with and without the decode weight absorption side by side).
PRESET_DEFAULTS: dict[str, dict] = {
    "deepseek": dict(dtype="bfloat16", systems="hf_eager,xllm_compiler", also_disable_pass=["absorb_mla_weights"]),
}
KV_POOL_BYTES = 2**30  # the pool the KV figures are quoted for: tokens that fit in 1 GiB
METRICS = ("compile_s", "prefill_512_s", "decode_bs1_tok_s", "decode_bs8_tok_s", "decode_bs32_tok_s", "peak_rss_mb")


def decode_metric(batch: int) -> str:
    return f"decode_bs{batch}_tok_s"


def make_prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=generator).tolist()


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def describe(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


# -- the systems (worker side) ------------------------------------------------------------------------


def load_hf(model_dir: str, dtype: str, compiled: bool):
    """generate(prompts, n) over transformers' model; ``compiled`` takes the static-cache torch.compile path."""
    import transformers

    transformers.logging.set_verbosity_error()
    config = json.loads((Path(model_dir) / "config.json").read_text())
    model_class = getattr(transformers, config["architectures"][0])
    model = model_class.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None  # every run makes exactly n tokens, like ignore_eos
    model.generation_config.pad_token_id = 0
    options: dict = {"do_sample": False}
    if compiled:
        compile_config = transformers.CompileConfig(fullgraph=True, dynamic=False, mode="default")
        compile_config._compile_all_devices = True  # transformers otherwise compiles on CUDA-like devices only
        options |= {"cache_implementation": "static", "compile_config": compile_config}

    @torch.inference_mode()
    def generate(prompts: list[list[int]], n: int) -> list[list[int]]:
        ids = torch.tensor(prompts)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, **options)
        if compiled and n > 1 and getattr(model, "_compiled_call", None) is None:
            raise RuntimeError("transformers did not compile the decode step (auto-compile criteria not met)")
        if out.shape[1] != ids.shape[1] + n:
            raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens instead of {n}")
        return out[:, ids.shape[1] :].tolist()

    return generate


def compile_xllm(model_dir: str, out: str, dtype: str, disable_passes: list[str]) -> float:
    """compile() wall time; ``dtype`` int8 or int4 means quantize=dtype over bfloat16 activations."""
    import xllm_compiler

    options = dict(decode_buckets=[1, 8, 32], prefill_buckets=[32, 512], max_seq_len=640, force=True, cache_dir="")
    options["disable_passes"] = tuple(disable_passes)
    if dtype in QUANTIZED:
        dtype, options["quantize"] = "bfloat16", dtype
    return timed(lambda: xllm_compiler.compile(model_dir, out, dtype=dtype, **options))[0]


def load_system(spec: dict):
    if spec["system"] == "xllm_compiler":
        import xllm_compiler

        if not Path(spec["artifact"], "manifest.json").exists():
            raise RuntimeError("no artifact: its compile failed")
        model = xllm_compiler.load(spec["artifact"])

        def generate(prompts: list[list[int]], n: int) -> list[list[int]]:
            return model.generate(prompts, max_new_tokens=n, ignore_eos=True)

        stats = model.memory_stats()
        generate.kv_cache_bytes = stats["kv_cache_bytes"]  # the pool, allocated at load
        generate.kv_bytes_per_token = stats.get("kv_bytes_per_token", 0)
        generate.expanded_kv_bytes_per_token = stats.get("expanded_kv_bytes_per_token", 0)  # MLA only
        return generate
    return load_hf(spec["model_dir"], spec["dtype"], compiled=spec["system"] == "torch_compile")


# -- workers: one fresh process per job, so compile caches, memory and crashes stay apart ---------------


def rss_hwm() -> int | None:
    """The kernel's peak RSS of this process (VmHWM) in bytes; None where /proc does not have it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class RssPeak:
    """Peak RSS while the block runs: Linux's VmHWM, reset on entry (clear_refs 5), else psutil every 5 ms."""

    def __enter__(self):
        import psutil

        self.process, self.peak, self.thread = psutil.Process(), 0, None
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.exact = rss_hwm() is not None
        except OSError:
            self.exact = False
        if not self.exact:  # a sampling thread: it competes with the model for the cores, so not too often
            self.done = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while True:
            self.peak = max(self.peak, self.process.memory_info().rss)
            if self.done.wait(0.005):
                return

    def __exit__(self, *exc):
        if self.thread is not None:
            self.done.set()
            self.thread.join()
        self.peak = max(self.peak, rss_hwm() if self.exact else 0, self.process.memory_info().rss)


def worker_measure(spec: dict) -> dict:
    """compile_s (first sample), prefill_512_s and the decode figures of one system in one dtype."""
    system, runs = spec["system"], spec["runs"]
    metrics: dict[str, dict] = {}
    tokens: dict[str, list] = {}
    decode_prompts = make_prompts(spec["vocab"], max(spec["batches"]), PROMPT_LEN, seed=0)
    prefill_prompt = make_prompts(spec["vocab"], 1, PREFILL_LEN, seed=1)

    def attempt(metric: str, fn) -> None:
        try:
            metrics[metric] = {"samples": fn()}
        except Exception as exc:
            metrics[metric] = {"error": describe(exc)}

    if system == "xllm_compiler":
        compile_args = (spec["model_dir"], spec["artifact"], spec["dtype"], spec["disable_passes"])
        attempt("compile_s", lambda: [compile_xllm(*compile_args)])
    try:
        generate = load_system(spec)
    except Exception as exc:
        return {"error": describe(exc), "metrics": metrics}
    if system == "torch_compile":  # the first generate compiles: timed in this fresh process
        attempt("compile_s", lambda: [timed(generate, decode_prompts[:1], NEW_TOKENS)[0]])

    # Every timed call gets prompts no earlier call has seen (the same ones for every system): the compiled
    # model's prefix cache would otherwise serve a repeated prompt's prefill from the KV blocks of the last.
    def fresh(batch: int, length: int, call: int) -> list[list[int]]:
        return make_prompts(spec["vocab"], batch, length, seed=1000 * length + 10 * batch + call)

    def prefill() -> list[float]:
        generate(prefill_prompt, 1)
        return [timed(generate, fresh(1, PREFILL_LEN, run), 1)[0] for run in range(runs)]

    def decode(batch: int) -> list[float]:
        prompts = decode_prompts[:batch]
        generate(prompts, NEW_TOKENS)  # warm-up (torch_compile: compiles this batch size)
        ones, fulls = [], []
        for run in range(runs):
            ones.append(timed(generate, fresh(batch, PROMPT_LEN, 2 * run), 1)[0])
            full, tokens[str(batch)] = timed(generate, fresh(batch, PROMPT_LEN, 2 * run + 1), NEW_TOKENS)
            fulls.append(full)
        one = statistics.median(ones)  # one prefill: a stall in it would otherwise inflate a run's tokens/s
        if max(fulls) <= one:
            raise RuntimeError("generating 64 tokens never took longer than generating 1")
        return [(NEW_TOKENS - 1) * batch / (full - one) for full in fulls if full > one]

    # Decode before prefill: transformers reuses a static cache that is large enough, so after the 512-token
    # prompt torch_compile would decode over a 513-long cache, and dynamo, having seen two cache lengths,
    # recompiles the next batch size with a dynamic length (3x slower at batch 8 in bfloat16).
    for batch in spec["batches"]:
        attempt(decode_metric(batch), lambda batch=batch: decode(batch))
    attempt("prefill_512_s", prefill)
    return {"metrics": metrics, "tokens": tokens}


def worker_compile(spec: dict) -> dict:
    """One more compile_s sample, in a fresh process."""
    if spec["system"] == "xllm_compiler":
        seconds = compile_xllm(spec["model_dir"], spec["artifact"], spec["dtype"], spec["disable_passes"])
        shutil.rmtree(spec["artifact"], ignore_errors=True)
    else:
        generate = load_system(spec)
        seconds = timed(generate, make_prompts(spec["vocab"], 1, PROMPT_LEN, seed=0), NEW_TOKENS)[0]
    return {"metrics": {"compile_s": {"samples": [seconds]}}}


def worker_rss(spec: dict) -> dict:
    """peak_rss_mb of generate(batch 8 x 64 tokens) in a process holding only this system."""
    import psutil

    generate = load_system(spec)
    loaded = psutil.Process().memory_info().rss
    prompts = make_prompts(spec["vocab"], RSS_BATCH, PROMPT_LEN, seed=0)
    with RssPeak() as first:
        generate(prompts, NEW_TOKENS)
    samples = []
    for _ in range(spec["runs"]):
        with RssPeak() as peak:
            generate(prompts, NEW_TOKENS)
        samples.append(peak.peak / 1e6)
    info = {
        "after_load_mb": loaded / 1e6,
        "first_call_peak_mb": first.peak / 1e6,
        "kv_cache_mb": getattr(generate, "kv_cache_bytes", 0) / 1e6,
        "kv_bytes_per_token": getattr(generate, "kv_bytes_per_token", 0),
        "expanded_kv_bytes_per_token": getattr(generate, "expanded_kv_bytes_per_token", 0),
        "exact": first.exact,
    }
    return {"metrics": {"peak_rss_mb": {"samples": samples}}, "info": info}


WORKERS = {"measure": worker_measure, "compile": worker_compile, "rss": worker_rss}


def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    try:
        result = WORKERS[spec["mode"]](spec)
    except Exception as exc:
        result = {"error": describe(exc)}
    Path(spec["result"]).write_text(json.dumps(result))


def run_worker(spec: dict, work: Path, inductor_cache: Path | None = None) -> dict:
    """Run one worker process; a crash or a timeout becomes {"error": ...}. Without ``inductor_cache`` it gets
    an empty inductor cache of its own, so a torch.compile in it compiles from scratch."""
    name = f"{spec['mode']}-{spec['system']}-{spec['dtype']}-{len(list(work.glob('*.spec.json')))}"
    spec = spec | {"result": str(work / f"{name}.result.json")}
    (work / f"{name}.spec.json").write_text(json.dumps(spec))
    log = work / f"{name}.log"
    env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(inductor_cache or work / f"inductor-{name}")}
    command = [sys.executable, str(Path(__file__).resolve()), "--_worker", str(work / f"{name}.spec.json")]
    try:
        with open(log, "w") as out:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {WORKER_TIMEOUT_S} s"}
    result_path = Path(spec["result"])
    if result_path.exists():
        return json.loads(result_path.read_text())
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
    return {"error": f"worker exited with code {code.returncode}: {tail[0] if tail else 'no output'}"[:300]}


# -- machine facts (parent side) -----------------------------------------------------------------------


def read_bandwidth_gbs(gigabytes: float = 1.0, repeats: int = 5) -> tuple[float, str]:
    """Best GB/s of reading float32 data much larger than the caches, on the current thread count, and how.

    Two readers: torch summing a tensor, and a one-row matrix-vector product over a packed matrix in
    xllm_compiler's linear kernel (where it was built). On this project's machine the second streams
    about a fifth faster than torch's reductions, so the sum alone would understate the limit."""
    x = torch.ones(int(gigabytes * 1e9) // 4)
    results = {"summing a tensor": _best_gbs(x.sum, x.numel() * 4, repeats)}
    del x
    from xllm_compiler.ops.native import native_kernels

    native = native_kernels()
    if native is not None and "float32" in native.packed_linear_dtypes():
        columns = 4096
        packed = native.pack_linear_weight(torch.ones(int(gigabytes * 1e9) // 4 // columns, columns))
        vector, out = torch.ones(1, columns), torch.empty(1, packed.shape[0] * 64)
        read = functools.partial(native.packed_linear_out, vector, packed, None, out)
        results["a matrix-vector product"] = _best_gbs(read, packed.numel() * 4, repeats)
    how = max(results, key=results.get)
    return results[how], how


def _best_gbs(read, nbytes: int, repeats: int) -> float:
    read()
    return nbytes / min(timed(read)[0] for _ in range(repeats)) / 1e9


def weight_bytes_per_step(model_dir: Path, dtype: str) -> int:
    """Bytes a batch-1 decode step reads: every tensor, but one row of an untied input embedding and, in an
    MoE layer, top_k of its experts; each at ``dtype``'s bytes per weight (int8/int4: as if every tensor
    were quantized; the norms, which are not, are a few KB)."""
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    experts = config.get("num_experts") or config.get("num_local_experts") or config.get("n_routed_experts")
    routed = config["num_experts_per_tok"] / experts if experts else 1.0

    shapes: dict[str, list[int]] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            shapes |= {name: f.get_slice(name).get_shape() for name in f.keys()}  # noqa: SIM118 (not a dict)
    tied = not any(name.endswith("lm_head.weight") for name in shapes)
    elements = 0
    for name, shape in shapes.items():
        numel = 1
        for size in shape:
            numel *= size
        if name.endswith("embed_tokens.weight") and not tied:
            numel = shape[-1]
        elements += numel * routed if ".experts." in name else numel
    return int(elements * BYTES_PER_WEIGHT[dtype])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- rows, table, plot ---------------------------------------------------------------------------------


def make_row(system: str, dtype: str, metric: str, entry: dict) -> dict:
    samples = entry.get("samples") or []
    row = {
        "system": system,
        "dtype": dtype,
        "metric": metric,
        "median": statistics.median(samples) if samples else None,
        "min": min(samples) if samples else None,
        "max": max(samples) if samples else None,
        "unit": UNITS.get(metric, "tok/s"),
        "samples": list(samples),
    }
    if not samples:
        row["error"] = entry.get("error", "not measured")
    return row


def pool_rounds(rows: list[dict]) -> list[dict]:
    """One row per (system, dtype, metric), its samples those of every round's row (first-seen order); a
    figure no round measured keeps the first round's error."""
    pooled: dict[tuple[str, str, str], dict] = {}
    for row in rows:
        key = (row["system"], row["dtype"], row["metric"])
        entry = pooled.setdefault(key, {"samples": [], "error": row.get("error")})
        entry["samples"] += row["samples"]
    return [make_row(*key, entry) for key, entry in pooled.items()]


def format_value(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def print_table(console, rows: list[dict], dtype: str, systems: list[str], limit: float | None) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"{dtype}: median [min-max]; decode also as % of the bandwidth limit at that batch"))
    table.add_column("metric")
    table.add_column("unit")
    for system in systems:
        table.add_column(system, justify="right")
    present = {row["metric"] for row in rows if row["dtype"] == dtype}
    for metric in [m for m in METRICS if m in present]:
        cells = []
        for system in systems:
            row = next((r for r in rows if (r["system"], r["dtype"], r["metric"]) == (system, dtype, metric)), None)
            if row is None:
                cells.append("-")
            elif row["median"] is None:
                cells.append("[red]error[/red]")
            else:
                cell = f"{format_value(row['median'])} [{format_value(row['min'])}-{format_value(row['max'])}]"
                if metric.startswith("decode_bs") and limit:
                    batch = int(metric.removeprefix("decode_bs").removesuffix("_tok_s"))
                    cell += f" {100 * row['median'] / (batch * limit):.0f}%"
                cells.append(escape(cell))
        table.add_row(metric, UNITS.get(metric, "tok/s"), *cells)
    console.print(table)


def print_speedups(console, rows: list[dict], dtype: str, systems: list[str], over: str = "hf_eager") -> None:
    """Each system's prefill and decode figures over ``over``'s (above 1: faster than it)."""
    reference = {r["metric"]: r["median"] for r in rows if (r["system"], r["dtype"]) == (over, dtype)}
    for system in [s for s in systems if s != over]:
        parts = []
        for row in rows:
            base = reference.get(row["metric"])
            if (row["system"], row["dtype"]) != (system, dtype) or not base or not row["median"]:
                continue
            if row["metric"] == "prefill_512_s":
                parts.append(f"prefill_512 {base / row['median']:.2f}x")
            elif row["metric"].startswith("decode_bs"):
                parts.append(f"{row['metric'].removesuffix('_tok_s')} {row['median'] / base:.2f}x")
        if parts:
            console.print(f"{system} over {over} ({dtype}, medians; above 1: faster): " + ", ".join(parts))


def kv_line(system: str, dtype: str, info: dict) -> str | None:
    """KV bytes per token and the tokens a KV_POOL_BYTES pool holds; for MLA also with expanded K/V."""
    per_token, expanded = info.get("kv_bytes_per_token"), info.get("expanded_kv_bytes_per_token")
    if not per_token:
        return None
    line = f"KV cache {system} {dtype}: {per_token} B/token, {KV_POOL_BYTES // per_token} tokens per GiB"
    if expanded:
        line += (
            f"; expanded K/V would take {expanded} B/token ({expanded / per_token:.1f}x), "
            f"{KV_POOL_BYTES // expanded} tokens per GiB"
        )
    return line


def write_plot(path: Path, rows: list[dict], dtypes: list[str], systems: list[str], limits: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        batches = []
        for system in systems:
            points = [
                (int(r["metric"].removeprefix("decode_bs").removesuffix("_tok_s")), r)
                for r in rows
                if (r["system"], r["dtype"]) == (system, dtype) and r["metric"].startswith("decode_bs")
            ]
            points = sorted((b, r) for b, r in points if r["median"] is not None)
            batches += [b for b, _ in points]
            if points:
                x = [b for b, _ in points]
                y = [r["median"] for _, r in points]
                err = [[r["median"] - r["min"] for _, r in points], [r["max"] - r["median"] for _, r in points]]
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=system)
        if batches:
            x = sorted(set(batches))
            ax.plot(x, [b * limits[dtype] for b in x], "k--", label="bandwidth limit (weights read once per step)")
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="decode tokens/s", title=dtype)
        ticks = sorted(set(batches)) or [1]
        ax.set_xticks(ticks, labels=[str(b) for b in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- the run ---------------------------------------------------------------------------------------------


def measure_llama_cpp(console, args, model_dir: Path, work: Path, variants: list[str], runs: int, batches: list[int]):
    """llama_cpp's rows for each variant (a GGUF file each, converted here) and what to print about each."""
    if (here := str(Path(__file__).resolve().parent)) not in sys.path:
        sys.path.insert(0, here)
    from gguf_convert import GGUF_TYPES, bytes_per_step, convert
    from llama_cpp_bench import batched_bench_next_to, measure, summary

    batched = args.llama_batched_bench or batched_bench_next_to(args.llama_bench)
    names = ["prefill_512_s", *map(decode_metric, batches)]
    rows, notes = [], {}
    for dtype in variants:
        gguf_type, path = GGUF_TYPES[dtype], work / f"model-{GGUF_TYPES[dtype]}.gguf"
        console.print(f"{dtype} {LLAMA_CPP}: GGUF {gguf_type}, measuring")
        try:
            if not args.llama_bench.is_file():
                raise FileNotFoundError(f"--llama-bench {args.llama_bench}: no such file")
            seconds = timed(convert, model_dir, path, gguf_type)[0]
            measured = measure(path, args.llama_bench, batched, args.threads, runs, batches)
            size = path.stat().st_size / 1e6
            notes[dtype] = measured["info"] | dict(gguf_type=gguf_type, mb=size, convert_s=seconds)
            notes[dtype]["bytes_per_step"] = bytes_per_step(path)
            notes[dtype]["summary"] = summary(notes[dtype])
        except Exception as exc:
            measured = {"error": describe(exc)}
        finally:
            path.unlink(missing_ok=True)
        metrics = measured.get("metrics", {})
        for metric in names:
            entry = metrics.get(metric) or {"error": measured.get("error", "not measured")}
            rows.append(make_row(LLAMA_CPP, dtype, metric, entry))
    return rows, notes


def correctness(console, results: dict, dtypes: list[str], systems: list[str]) -> None:
    """Greedy tokens of each system against hf_eager (else torch_compile); float32 must agree."""
    reference = next((s for s in ("hf_eager", "torch_compile") if s in systems), None)
    for dtype in dtypes:
        ref = results.get((reference, dtype), {}).get("tokens", {})
        for system in systems:
            got = results.get((system, dtype), {}).get("tokens", {})
            if system == reference or not ref or not got:
                continue
            parts, first_ok = [], True
            for batch in sorted(set(ref) & set(got), key=int):
                a, b = ref[batch], got[batch]
                same_first = sum(x[0] == y[0] for x, y in zip(a, b, strict=True))
                prefix = next((i for i, (x, y) in enumerate(zip(a[0], b[0], strict=True)) if x != y), len(a[0]))
                first_ok &= same_first == len(a)
                parts.append(f"bs{batch}: first token equal {same_first}/{len(a)}, greedy prefix {prefix}/{len(a[0])}")
            line = f"{system} vs {reference} ({dtype}): " + "; ".join(parts)
            if dtype == "float32" and not first_ok:
                console.print(f"[bold yellow]WARNING[/bold yellow] first tokens differ: {line}")
            else:
                console.print(line)


def widths(parser: argparse.ArgumentParser, value: str, flag: str) -> list[str]:
    """A --quantize / --llama-quant value as its list of widths ('none' for none); anything else refused."""
    chosen = [w.strip() for w in value.split(",") if w.strip() and w.strip() != "none"]
    if set(chosen) - set(QUANTIZED):
        parser.error(f"{flag} takes int8, int4 or none")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="checkpoint to benchmark (default: a random --preset)")
    parser.add_argument("--preset", choices=["llama-100m", "mixtral-100m", "deepseek"], default="llama-100m")
    parser.add_argument("--dtype", choices=[*DTYPES, "both"], help="default: both (--preset deepseek: bfloat16)")
    parser.add_argument("--systems", help="comma-separated subset of " + ",".join(SYSTEMS) + " (default: all)")
    parser.add_argument(
        "--also-disable-pass",
        action="append",
        metavar="NAME[,NAME]",
        help="one more column: xllm_compiler compiled without these passes (repeatable; one column each)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, every system")
    parser.add_argument("--runs", type=int, help="timed runs per figure (default 3; --quick: 2, one compile run)")
    parser.add_argument("--quick", action="store_true", help="batches 1 and 8 only, fewer runs")
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure every system this many times over, in turn, and pool the runs"
    )
    parser.add_argument("--json", type=Path, help="write the rows (a list of dicts) here")
    parser.add_argument("--plot", type=Path, help="write a PNG of decode tokens/s per batch size here")
    parser.add_argument(
        "--quantize",
        default="none",
        metavar="W[,W]|none",
        help="also our artifact with quantize=W (int8, int4; bfloat16 activations), a table each (default none)",
    )
    parser.add_argument("--llama-bench", type=Path, metavar="PATH", help="also run llama.cpp: its llama-bench binary")
    parser.add_argument(
        "--llama-batched-bench", type=Path, metavar="PATH", help="for llama.cpp's batch>1 decode (default: its sibling)"
    )
    parser.add_argument(
        "--llama-quant",
        default="int8,int4",
        metavar="W[,W]|none",
        help="with --llama-bench, also llama.cpp at these widths: int8 = GGUF Q8_0, int4 = Q4_0 (default %(default)s)",
    )
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        return worker_main(args._worker)

    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a log file or a pipe: rich would wrap the tables at 80 columns
        console = Console(width=150)
    start, load = time.perf_counter(), os.getloadavg()[0]
    defaults = {} if args.model_dir else PRESET_DEFAULTS.get(args.preset, {})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    systems = [s.strip() for s in (args.systems or ",".join(SYSTEMS)).split(",") if s.strip()]
    if not systems or set(systems) - set(SYSTEMS):
        parser.error(f"--systems takes a subset of {','.join(SYSTEMS)}")
    variants = {}  # column -> the passes its artifact is compiled without
    for names in args.also_disable_pass or []:
        passes = [name.strip() for name in names.split(",") if name.strip()]
        variants[f"xllm_compiler (no {', '.join(passes)})"] = passes
    columns = systems + list(variants)
    quant = widths(parser, args.llama_quant, "--llama-quant")
    ours_quantized = widths(parser, args.quantize, "--quantize")
    if ours_quantized and "xllm_compiler" not in systems:
        parser.error("--quantize measures xllm_compiler: keep it in --systems")
    dtype_choice = args.dtype or "both"
    dtypes = list(DTYPES) if dtype_choice == "both" else [dtype_choice]
    runs = args.runs or (2 if args.quick else 3)
    if args.rounds < 1:
        parser.error("--rounds takes a positive count")
    compile_runs = 1 if args.quick else runs
    batches = [1, 8] if args.quick else [1, 8, 32]
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="xllm-bench-") as tmp:
        work = Path(tmp)
        model_dir = args.model_dir
        if model_dir is None:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from random_checkpoint import write_checkpoint

            model_dir = write_checkpoint(work / "model", args.preset, torch.float32)
        model_dir = model_dir.resolve()
        if not (model_dir / "config.json").is_file():
            parser.error(f"{model_dir} has no config.json")
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        repeats = 3 if args.quick else 5
        bandwidth, reader = read_bandwidth_gbs(repeats=repeats)
        limits = {d: bandwidth * 1e9 / weight_bytes_per_step(model_dir, d) for d in dtypes + ours_quantized}

        console.print(f"[bold]machine[/bold]: {cpu_name()}, {os.cpu_count()} CPUs, {args.threads} torch threads")
        busy = "[bold yellow] (other processes are busy: timings will be noisy)[/bold yellow]" if load > 0.5 else ""
        console.print(f"load average (1 min) before the run: {load:.2f}{busy}")
        console.print(f"torch {torch.__version__}, python {platform.python_version()}, model {model_dir}")
        console.print(f"memory read bandwidth: {bandwidth:.1f} GB/s (1 GB of float32, best of {repeats}, by {reader})")
        for d in dtypes + ours_quantized:
            mb = weight_bytes_per_step(model_dir, d) / 1e6
            console.print(f"decode limit at batch 1, {d}: {mb:.0f} MB of weights per step -> {limits[d]:.1f} tok/s")
        console.print(
            "compile_s: xllm_compiler with the compile cache off (cache_dir=''); torch_compile = first generate() "
            "in a fresh process with an empty inductor cache"
        )

        results: dict[tuple[str, str], dict] = {}
        rows: list[dict] = []
        rss_info: dict[tuple[str, str], dict] = {}
        shown = [*columns, LLAMA_CPP] if args.llama_bench else columns
        notes: dict[str, dict] = {}
        figures = ["prefill_512_s", *map(decode_metric, batches)]  # what every round measures
        for round_index in range(args.rounds):
            label = f" (round {round_index + 1} of {args.rounds})" if args.rounds > 1 else ""
            for dtype in dtypes + ours_quantized:
                for system in columns if dtype in DTYPES else ["xllm_compiler"]:
                    disabled = variants.get(system, [])
                    spec = dict(
                        system="xllm_compiler" if disabled else system,
                        disable_passes=disabled,
                        dtype=dtype,
                        model_dir=str(model_dir),
                        artifact=str(work / "-".join(["artifact", dtype, *disabled])),
                        vocab=vocab,
                        threads=args.threads,
                        runs=runs,
                        batches=batches,
                    )
                    console.print(f"[{time.perf_counter() - start:6.0f} s] {dtype} {system}: measuring{label}")
                    inductor_cache = work / f"inductor-measure-{system}-{dtype}"
                    measured = run_worker(spec | {"mode": "measure"}, work, inductor_cache)
                    results.setdefault((system, dtype), measured)
                    metrics = measured.get("metrics", {})
                    if round_index > 0:
                        rows += [make_row(system, dtype, m, metrics.get(m) or {"error": "-"}) for m in figures]
                        continue
                    names = ["compile_s"] * (spec["system"] != "hf_eager") + figures
                    if spec["system"] != "hf_eager":
                        for run in range(1, compile_runs):
                            extra = run_worker(
                                spec | {"mode": "compile", "artifact": f"{spec['artifact']}-{run}"}, work
                            )
                            sample = extra.get("metrics", {}).get("compile_s", {}).get("samples", [])
                            metrics.setdefault("compile_s", {}).setdefault("samples", []).extend(sample)
                    console.print(f"[{time.perf_counter() - start:6.0f} s] {dtype} {system}: peak RSS")
                    rss_spec = spec | {"mode": "rss", "runs": 1 if args.quick else runs}
                    rss = run_worker(rss_spec, work, inductor_cache)  # a warm inductor cache: its compile is not timed
                    rss_info[(system, dtype)] = rss.get("info", {})
                    metrics["peak_rss_mb"] = rss.get("metrics", {}).get("peak_rss_mb", {"error": rss.get("error")})
                    for metric in [*names, "peak_rss_mb"]:
                        entry = metrics.get(metric) or {"error": measured.get("error", "not measured")}
                        rows.append(make_row(system, dtype, metric, entry))
            if args.llama_bench:
                console.print(f"[{time.perf_counter() - start:6.0f} s] {LLAMA_CPP}: converting and measuring{label}")
                llama_rows, notes = measure_llama_cpp(console, args, model_dir, work, dtypes + quant, runs, batches)
                rows += llama_rows
        rows = pool_rounds(rows)
        for dtype in quant if args.llama_bench else []:  # a GGUF file's own bytes: what llama.cpp reads per step
            per_step = notes.get(dtype, {}).get("bytes_per_step")
            limits[dtype] = bandwidth * 1e9 / per_step if per_step else limits.get(dtype)
        tables = dtypes + [w for w in QUANTIZED if w in ours_quantized or (args.llama_bench and w in quant)]

        elapsed = time.perf_counter() - start
        for dtype in tables:
            present = [c for c in shown if any((r["system"], r["dtype"]) == (c, dtype) for r in rows)]
            print_table(console, rows, dtype, present, limits[dtype])
        if "hf_eager" in systems:
            for dtype in dtypes:
                print_speedups(console, rows, dtype, shown)
        if args.llama_bench:
            for dtype in tables:
                print_speedups(console, rows, dtype, [c for c in columns if c.startswith("xllm")], over=LLAMA_CPP)
        for row in rows:
            if "error" in row:
                console.print(f"[red]error[/red] {row['system']} {row['dtype']} {row['metric']}: {row['error']}")
        for (system, dtype), info in rss_info.items():
            if info:
                pool = f" (KV pool of {info['kv_cache_mb']:.0f} MB allocated)" if info.get("kv_cache_mb") else ""
                console.print(
                    f"RSS {system} {dtype}: {info['after_load_mb']:.0f} MB after load{pool}; "
                    f"{info['first_call_peak_mb']:.0f} MB peak in the first (warm-up) generate"
                    + ("" if info.get("exact", True) else " (sampled every 5 ms: VmHWM not available)")
                )
            if line := kv_line(system, dtype, info):
                console.print(line)
        if "torch_compile" in systems:
            console.print(
                "torch_compile: transformers compiles the decode step only; its prefill_512_s is an eager prefill "
                "over a static cache"
            )
        for dtype, note in notes.items():
            console.print(f"{LLAMA_CPP} {dtype}: {note['summary']}")
            if dtype in quant and limits[dtype]:
                mb = note["bytes_per_step"] / 1e6
                console.print(
                    f"decode limit at batch 1, {dtype}: {mb:.0f} MB of GGUF per step -> {limits[dtype]:.1f} tok/s"
                )
        correctness(console, results, dtypes, columns)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
        if args.plot:
            write_plot(args.plot, rows, dtypes, shown, limits)
        console.print(f"load average over the last 5 minutes of the run: {os.getloadavg()[1]:.2f}")
        console.print(f"total: {elapsed:.0f} s ({runs} runs, {compile_runs} compile runs, batches {batches})")


if __name__ == "__main__":
    main()
