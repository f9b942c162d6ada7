"""llama.cpp as a peer system of tools/bench.py: run llama-bench and llama-batched-bench on a GGUF file and
read their output into bench.py's figures.

  prefill_512_s     llama-bench -p 512: one 512-token prompt per repetition (its samples_ns), -r runs.
  decode_bs1_tok_s  llama-bench -n 63: 63 tokens one at a time from an empty cache, per repetition 63 / time.
  decode_bsB_tok_s  llama-batched-bench -npp 32 -ntg 63 -npl B: B sequences of a 32-token prompt, then 63 steps
                    of B tokens: its S_TG = 63 * B / time of those steps, which is what bench.py measures for
                    us (the first token, which the prompt's step makes, is left out of both). It repeats no
                    test, so -npl lists each batch --runs times.
Both run with llama.cpp's defaults otherwise (its flash-attention choice, an f16 KV cache, batch 2048) and
-t THREADS for every step, and warm up before they time.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

PROMPT_LEN, NEW_TOKENS, PREFILL_LEN = 32, 64, 512  # bench.py's shapes
TIMEOUT_S = 1200
#: What bench.py prints about the build, from llama-bench's JSON.
INFO_KEYS = ("build_commit", "build_number", "backends", "n_threads", "flash_attn", "type_k", "type_v")


class LlamaCppError(RuntimeError):
    """A llama.cpp binary is missing, failed, or printed what this module cannot read (one line)."""


def batched_bench_next_to(llama_bench: Path) -> Path | None:
    """llama-batched-bench in llama-bench's folder, where cmake's --target for both puts them."""
    sibling = Path(llama_bench).with_name("llama-batched-bench")
    return sibling if sibling.is_file() else None


def llama_bench_command(binary: Path, model: Path, threads: int, runs: int) -> list[str]:
    shapes = ["-p", str(PREFILL_LEN), "-n", str(NEW_TOKENS - 1)]
    return [str(binary), "-m", str(model), *shapes, "-t", str(threads), "-r", str(runs), "-o", "json"]


def batched_bench_command(binary: Path, model: Path, threads: int, runs: int, batches: list[int]) -> list[str]:
    """Each batch ``runs`` times; a context of twice what the largest batch needs, so that every sequence fits
    its share of the KV cache (without a unified cache each of the -npl sequences gets n_ctx / max B)."""
    context = 2 * max(batches) * (PROMPT_LEN + NEW_TOKENS)
    parallel = ",".join(str(batch) for batch in batches for _ in range(runs))
    shapes = ["-npp", str(PROMPT_LEN), "-ntg", str(NEW_TOKENS - 1), "-npl", parallel]
    return [str(binary), "-m", str(model), "-c", str(context), "-t", str(threads), *shapes, "--output-format", "jsonl"]


def run(command: list[str], timeout: int = TIMEOUT_S) -> tuple[str, str]:
    """(stdout, stderr) of a successful run, else LlamaCppError naming the binary and its last stderr line."""
    name = Path(command[0]).name
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout)
    except FileNotFoundError:
        raise LlamaCppError(f"{command[0]}: no such file") from None
    except PermissionError:
        raise LlamaCppError(f"{command[0]}: not executable") from None
    except subprocess.TimeoutExpired:
        raise LlamaCppError(f"{name} timed out after {timeout} s") from None
    if done.returncode:
        tail = [line for line in done.stderr.splitlines() if line.strip()][-1:]
        raise LlamaCppError(f"{name} exited with code {done.returncode}: {tail[0] if tail else 'no output'}"[:300])
    return done.stdout, done.stderr


def parse_llama_bench_json(text: str) -> tuple[dict[str, list[float]], dict]:
    """llama-bench -o json -> ({"prefill_<P>_s": seconds per run, "decode_bs1_tok_s": tokens/s per run},
    the first test's build and settings). A prompt test has n_gen 0, a generation test n_prompt 0."""
    try:
        tests = json.loads(text[text.index("[") :])
    except (ValueError, json.JSONDecodeError) as exc:
        raise LlamaCppError(f"llama-bench printed no JSON list ({exc})") from None
    figures: dict[str, list[float]] = {}
    for test in tests:
        samples = [ns / 1e9 for ns in test.get("samples_ns", [])]
        if test.get("n_prompt") and not test.get("n_gen"):
            figures[f"prefill_{test['n_prompt']}_s"] = samples
        elif test.get("n_gen") and not test.get("n_prompt"):
            figures["decode_bs1_tok_s"] = [test["n_gen"] / s for s in samples]
    info = {key: tests[0][key] for key in INFO_KEYS if tests and key in tests[0]}
    return figures, info


def parse_batched_bench(text: str) -> list[dict[str, float]]:
    """llama-batched-bench's results, one dict per test (pp, tg, pl, speed_tg, ...): its JSONL lines or,
    without --output-format jsonl, the rows of its markdown table (| PP | TG | B | N_KV | T_PP s | S_PP t/s |
    T_TG s | S_TG t/s | T s | S t/s |). Log lines around them are skipped."""
    columns = ("pp", "tg", "pl", "n_kv", "t_pp", "speed_pp", "t_tg", "speed_tg", "t", "speed")
    results = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        elif line.startswith("|"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            try:
                values = [float(cell) for cell in cells]
            except ValueError:
                continue  # the header or its rule
            if len(values) == len(columns):
                results.append(dict(zip(columns, values, strict=True)))
    return results


def measure(
    model: Path, llama_bench: Path, batched_bench: Path | None, threads: int, runs: int, batches: list[int]
) -> dict:
    """bench.py's result shape: {"metrics": {metric: {"samples": [...]} | {"error": line}}, "info": {...}}."""
    command = llama_bench_command(llama_bench, model, threads, runs)
    info: dict = {"llama_bench": " ".join(command)}
    metrics: dict[str, dict] = {}
    single = (f"prefill_{PREFILL_LEN}_s", "decode_bs1_tok_s")
    try:
        figures, found = parse_llama_bench_json(run(command)[0])
        info |= found
        missing = "not in llama-bench's output"
        metrics |= {m: {"samples": figures[m]} if figures.get(m) else {"error": missing} for m in single}
    except LlamaCppError as exc:
        metrics |= {m: {"error": str(exc)} for m in single}
    batched = {batch: f"decode_bs{batch}_tok_s" for batch in batches if batch > 1}
    if not batched:
        return {"metrics": metrics, "info": info}
    if batched_bench is None:
        error = f"no llama-batched-bench next to {llama_bench} (give --llama-batched-bench)"
        return {"metrics": metrics | {m: {"error": error} for m in batched.values()}, "info": info}
    command = batched_bench_command(batched_bench, model, threads, runs, list(batched))
    info["batched_bench"] = " ".join(command)
    try:
        results = parse_batched_bench("\n".join(run(command)))  # its table goes to stdout or stderr by version
    except LlamaCppError as exc:
        return {"metrics": metrics | {m: {"error": str(exc)} for m in batched.values()}, "info": info}
    for batch, metric in batched.items():
        samples = [r["speed_tg"] for r in results if r["pl"] == batch and r["pp"] == PROMPT_LEN]
        metrics[metric] = {"samples": samples} if samples else {"error": f"no B={batch} row in batched-bench's output"}
    return {"metrics": metrics, "info": info}


def summary(info: dict) -> str:
    """One line about a measured GGUF file: its type and size, the llama.cpp build, the commands run."""
    line = f"GGUF {info['gguf_type']}, {info['mb']:.0f} MB (converted in {info['convert_s']:.1f} s), build "
    line += f"{info.get('build_commit', '?')} ({info.get('build_number', '?')}), {info.get('backends', '?')}, "
    line += f"flash_attn {info.get('flash_attn', '?')}; {info['llama_bench']}"
    return line + (f"; {info['batched_bench']}" if "batched_bench" in info else "")
