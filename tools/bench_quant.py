"""int8 and int4 weights against our bfloat16 and float32, back to back in one process: decode, prefill, accuracy.

    python tools/bench_quant.py [--rounds N] [--variants float32,bfloat16,int8,int8-f32,int4,int4-f32] [--threads N]
                                [--kernels-only | --accuracy-only | --skip-accuracy]

Compiles the random ~100M Llama of tools/random_checkpoint.py (preset llama-100m, float32 weights) once per
variant, loads every artifact into this process, then measures round by round, each round running every
variant in turn, so that a busy minute of a shared machine lands on all of them alike:

  float32 / bfloat16  the plain artifacts (dtype=...), our packed float kernels (ops/cpu_linear.cpp).
  int8                quantize="int8" with bfloat16 activations: every linear incl. the LM head on int8
                      weights, ops/cpu_quant.cpp's kernel (AVX512-VNNI, else AVX2).
  int8-f32            the same with float32 activations.
  int4, int4-f32      quantize="int4" (groups of 128), ops/cpu_int4.cpp's AVX2 kernel.

Figures (median [min-max] over the rounds): decode_bsB tok/s = 31 * B / (time(32 new tokens) - time(1 new
token)) for B prompts of 32 tokens; prefill_512 tok/s = 512 / time of a 512-token prompt making one token.
Every call has prompts never seen before, so the engine's prefix cache serves none of them.
Decode at batch 1 is also shown as a share of the bandwidth limit for that variant's bytes: the weight
bytes a step reads (every tensor of the artifact but the input embedding, of which one row) over the
machine's read bandwidth (bench.py's probe).

Accuracy (unless --skip-accuracy): on the random model, the quantized variants' last-position logits of 16
prompts against the same-dtype float artifact (max error over the largest logit, top-1 agreement); on
tools/tiny-llama (trained on its corpus) the corpus perplexity, float32 against int8 and int4 at each group
size (float32 activations).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import make_prompts, read_bandwidth_gbs
from random_checkpoint import write_checkpoint

import xllm_compiler

VARIANTS = {
    "float32": dict(dtype="float32"),
    "bfloat16": dict(dtype="bfloat16"),
    "int8": dict(dtype="bfloat16", quantize="int8"),
    "int8-f32": dict(dtype="float32", quantize="int8"),
    "int4": dict(dtype="bfloat16", quantize="int4"),
    "int4-f32": dict(dtype="float32", quantize="int4"),
}
COMPILE = dict(decode_buckets=[1, 8], prefill_buckets=[32, 512], max_seq_len=640, cache_dir="", force=True)
PROMPT_LEN, NEW_TOKENS, PREFILL_LEN = 32, 32, 512
TINY_LLAMA = Path(__file__).resolve().parent / "tiny-llama"
TINY_WINDOW = 64
#: The input (and output) dtype each kernel of kernel_table runs on; int8/int4 take bfloat16 rows, as their variants.
KERNEL_INPUT = {"float32": "float32", "bfloat16": "bfloat16", "int8": "bfloat16", "int4": "bfloat16"}
ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1, "I64": 8, "I32": 4}


def step_bytes(artifact: Path) -> int:
    """Weight bytes a batch-1 decode step reads: every stored tensor, of the input embedding one row."""
    total = 0
    with safe_open(str(artifact / "weights.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is no mapping)
            tensor = f.get_slice(name)
            shape, itemsize = tensor.get_shape(), ITEMSIZE[tensor.get_dtype()]
            rows = 1 if name.endswith("embed_tokens.weight") else shape[0]
            total += math.prod([rows, *shape[1:]]) * itemsize
    return total


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def measure(model, vocab: int, seed: int) -> dict[str, float]:
    """One round of one variant: decode bs1, bs8 (tokens/s) and prefill 512 (tokens/s). Every call gets
    prompts of its own (``seed``): a prompt seen before would be served from the engine's prefix cache."""
    figures = {}
    for batch in (1, 8):
        first, second = (make_prompts(vocab, batch, PROMPT_LEN, seed=seed * 100 + batch * 2 + i) for i in (0, 1))
        one = timed(model.generate, first, 1)
        full = timed(lambda p: model.generate(p, max_new_tokens=NEW_TOKENS, ignore_eos=True), second)
        figures[f"decode_bs{batch}"] = (NEW_TOKENS - 1) * batch / (full - one)
    prompt = make_prompts(vocab, 1, PREFILL_LEN, seed=seed * 100 + 99)
    figures["prefill_512"] = PREFILL_LEN / timed(model.generate, prompt, 1)
    return figures


def kernel_table(repeats: int) -> None:
    """The 49 linear layers alone (bench_linear.py's shapes), each kernel on its own packed weights, interleaved:
    ms per pass, best and median of ``repeats``, and weight bytes read per second at the best."""
    from bench_linear import LAYER, LM_HEAD

    from xllm_compiler.ops.native import native_kernels
    from xllm_compiler.ops.quant import DEFAULT_GROUP_SIZE, quantize_per_channel, quantize_per_group

    native = native_kernels()
    shapes = [*LAYER * 12, LM_HEAD]
    weights = [torch.randn(n, k) * 0.02 for n, k in shapes]
    packed = {
        "float32": [native.pack_linear_weight(w) for w in weights],
        "bfloat16": [native.pack_linear_weight(w.to(torch.bfloat16)) for w in weights],
    }
    quantized = [quantize_per_channel(w) for w in weights]
    packed["int8"] = [native.pack_int8_weight(q) for q, _ in quantized]
    scales = [s for _, s in quantized]
    group = DEFAULT_GROUP_SIZE
    grouped = [quantize_per_group(w, group) for w in weights]
    packed["int4"] = [
        (native.pack_int4_weight(q, w.shape[1], group), native.pack_int4_scales(s), native.pack_int4_scales(o))
        for (q, s, o), w in zip(grouped, weights, strict=True)
    ]
    nbytes = {"float32": 4, "bfloat16": 2, "int8": 1, "int4": 0.5 + 8 / group}
    elements = sum(w.numel() for w in weights)
    for rows in (1, 8, 512):
        dtypes = set(KERNEL_INPUT.values())  # the activations' dtypes (KERNEL_INPUT's keys are weight formats)
        outs = {d: [torch.empty(rows, w.shape[0], dtype=getattr(torch, d)) for w in weights] for d in dtypes}
        inputs = {d: [torch.randn(rows, w.shape[1]).to(getattr(torch, d)) for w in weights] for d in dtypes}
        times: dict[str, list[float]] = {name: [] for name in packed}

        def run(name: str, inputs=inputs, outs=outs) -> None:
            dtype = KERNEL_INPUT[name]
            for i, w in enumerate(packed[name]):
                if name == "int8":
                    native.int8_linear_out(inputs[dtype][i], w, scales[i], None, outs[dtype][i])
                elif name == "int4":
                    native.int4_linear_out(inputs[dtype][i], *w, group, None, outs[dtype][i])
                else:
                    native.packed_linear_out(inputs[dtype][i], w, None, outs[dtype][i])

        for _ in range(max(3, repeats // 4) if rows >= 256 else repeats):
            for name in packed:
                times[name].append(timed(run, name))
        cells = [
            f"{name} {min(t) * 1e3:6.2f} ms ({elements * nbytes[name] / min(t) / 1e9:4.1f} GB/s), "
            f"median {statistics.median(t) * 1e3:6.2f}"
            for name, t in times.items()
        ]
        print(f"kernels, rows {rows:3}: " + " | ".join(cells))


def accuracy(models: dict, vocab: int, console_print) -> None:
    prompts = make_prompts(vocab, 16, 24, seed=7)
    pairs = (("int8", "bfloat16"), ("int8-f32", "float32"), ("int4", "bfloat16"), ("int4-f32", "float32"))
    for name, reference in pairs:
        if name not in models or reference not in models:
            continue
        got, ref = models[name].logits(prompts), models[reference].logits(prompts)
        error = float((got - ref).abs().max() / ref.abs().max())
        top1 = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        console_print(
            f"random 100M, {name} vs {reference}: max logit error {error:.4f} of the largest, top-1 {top1:.0%}"
        )


def perplexity(model, ids: list[int]) -> float:
    """exp(mean NLL) of ``ids[1:]`` under teacher forcing, each token predicted from bos and the up to
    TINY_WINDOW - 1 tokens before it: the windows tools/make_tiny_model.py trains on (beyond them it has
    learnt nothing, and a long prefix would measure that, not the quantization)."""
    prefixes = [ids[:1] + ids[max(1, n - TINY_WINDOW + 1) : n] for n in range(1, len(ids))]
    nll = 0.0
    for start in range(0, len(prefixes), 64):
        chunk = prefixes[start : start + 64]
        logp = torch.log_softmax(model.logits(chunk), dim=-1)
        nll -= sum(float(logp[i, ids[start + i + 1]]) for i in range(len(chunk)))
    return math.exp(nll / len(prefixes))


def tiny_perplexity(work: Path, console_print) -> None:
    results = {}
    tiny = (
        ("float32", {}),
        ("int8", {"quantize": "int8"}),
        ("int8, LM head float", {"quantize": "int8", "quantize_lm_head": False}),
        *((f"int4 g{g}", {"quantize": "int4", "group_size": g}) for g in (32, 64, 128)),
        ("int4 g128, LM head float", {"quantize": "int4", "quantize_lm_head": False}),
    )
    for name, extra in tiny:
        out = work / f"tiny-{len(results)}"
        xllm_compiler.compile(TINY_LLAMA, out, dtype="float32", cache_dir="", force=True, **extra)
        model = xllm_compiler.load(out)
        ids = model.encode((TINY_LLAMA / "corpus.txt").read_text())[: model.max_seq_len]
        results[name] = perplexity(model, ids)
    base = results["float32"]
    cells = ", ".join(f"{name} {value:.4f} ({value / base - 1:+.2%})" for name, value in results.items())
    console_print(f"tools/tiny-llama corpus perplexity (float32 activations): {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS)
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads (default torch's; 1 is steadier on a loaded machine)"
    )
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--kernels-only", action="store_true", help="only the linear layers alone (kernel_table)")
    parser.add_argument("--accuracy-only", action="store_true", help="only the accuracy figures: no timing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [v for v in args.variants.split(",") if v]
    if set(names) - set(VARIANTS):
        parser.error(f"--variants takes a subset of {','.join(VARIANTS)}")
    print(f"{torch.get_num_threads()} threads; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not args.accuracy_only:
        kernel_table(repeats=3 * args.rounds)
    if args.kernels_only:
        return
    with tempfile.TemporaryDirectory(prefix="xllm-bench-quant-") as tmp:
        work = Path(tmp)
        model_dir = write_checkpoint(work / "model", "llama-100m", torch.float32)
        vocab = 32000
        models, limits = {}, {}
        bandwidth, how = read_bandwidth_gbs(repeats=3)
        print(f"read bandwidth {bandwidth:.1f} GB/s ({how})")
        for name in names:
            out = work / name
            seconds = timed(xllm_compiler.compile, model_dir, out, **VARIANTS[name], **COMPILE)
            models[name] = xllm_compiler.load(out)
            limits[name] = bandwidth * 1e9 / step_bytes(out)
            print(
                f"{name}: compiled in {seconds:.1f} s; {step_bytes(out) / 1e6:.0f} MB read per decode step, "
                f"batch-1 limit {limits[name]:.0f} tok/s"
            )
        if args.accuracy_only:
            accuracy(models, vocab, print)
            tiny_perplexity(work, print)
            return
        for model in models.values():  # warm-up: every bucket graph built once
            measure(model, vocab, seed=0)
        samples: dict[str, dict[str, list[float]]] = {name: {} for name in names}
        for round_ in range(args.rounds):
            for name in names:
                for metric, value in measure(models[name], vocab, seed=round_ + 1).items():
                    samples[name].setdefault(metric, []).append(value)
            print(f"round {round_ + 1}/{args.rounds} done")
        print(f"\n{'tok/s':10}" + "".join(f"{m:>26}" for m in ("decode_bs1", "decode_bs8", "prefill_512")))
        for name in names:
            cells = []
            for metric in ("decode_bs1", "decode_bs8", "prefill_512"):
                values = samples[name][metric]
                cell = f"{statistics.median(values):.0f} [{min(values):.0f}-{max(values):.0f}]"
                if metric == "decode_bs1":
                    cell += f" {statistics.median(values) / limits[name]:.0%}"
                cells.append(f"{cell:>26}")
            print(f"{name:10}" + "".join(cells))
        print("(decode_bs1 also as a share of the variant's bandwidth limit)")
        if not args.skip_accuracy:
            accuracy(models, vocab, print)
            tiny_perplexity(work, print)


if __name__ == "__main__":
    main()
