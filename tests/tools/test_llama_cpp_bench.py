"""tools/llama_cpp_bench.py: llama-bench and llama-batched-bench output read into bench.py's figures, the
commands it runs, and bench.py's llama_cpp rows, with shell scripts standing in for the binaries."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from tools import bench, llama_cpp_bench
from tools.llama_cpp_bench import (
    batched_bench_command,
    llama_bench_command,
    measure,
    parse_batched_bench,
    parse_llama_bench_json,
)

# The shape of `llama-bench -o json` (json_printer: "[\n", per test "  {\n", '    "%s": %s,\n' per field,
# samples_ns and samples_ts, "  }", tests joined by ",\n", "\n]\n"), fields cut to a few.
LLAMA_BENCH_JSON = """[
  {
    "build_commit": "b3f1c2a0",
    "build_number": 6100,
    "cpu_info": "AMD EPYC 7763 64-Core Processor",
    "backends": "CPU",
    "model_type": "llama ?B F32",
    "n_threads": 2,
    "flash_attn": false,
    "type_k": "f16",
    "n_prompt": 512,
    "n_gen": 0,
    "avg_ns": 590000000,
    "avg_ts": 867.797,
    "samples_ns": [ 600000000, 580000000 ],
    "samples_ts": [ 853.333, 882.759 ]
  },
  {
    "build_commit": "b3f1c2a0",
    "build_number": 6100,
    "cpu_info": "AMD EPYC 7763 64-Core Processor",
    "backends": "CPU",
    "model_type": "llama ?B F32",
    "n_threads": 2,
    "flash_attn": false,
    "type_k": "f16",
    "n_prompt": 0,
    "n_gen": 63,
    "avg_ns": 1000000000,
    "avg_ts": 63.0,
    "samples_ns": [ 1050000000, 950000000 ],
    "samples_ts": [ 60, 66.3158 ]
  }
]
"""
# llama-batched-bench --output-format jsonl: one LOG line per test, in its format string's key order.
BATCHED_JSONL = """
main: n_kv_max = 6144, n_batch = 2048, n_ubatch = 512
{"n_kv_max": 6144, "n_batch": 2048, "n_ubatch": 512, "flash_attn": 0, "is_pp_shared": 0, "n_gpu_layers": -1, \
"n_threads": 2, "n_threads_batch": 2, "pp": 32, "tg": 63, "pl": 8, "n_kv": 760, "t_pp": 0.261000, \
"speed_pp": 980.842957, "t_tg": 1.130000, "speed_tg": 446.017700, "t": 1.391000, "speed": 546.369507}
{"n_kv_max": 6144, "n_batch": 2048, "n_ubatch": 512, "flash_attn": 0, "is_pp_shared": 0, "n_gpu_layers": -1, \
"n_threads": 2, "n_threads_batch": 2, "pp": 32, "tg": 63, "pl": 8, "n_kv": 760, "t_pp": 0.255000, \
"speed_pp": 1003.921570, "t_tg": 1.150000, "speed_tg": 438.260864, "t": 1.405000, "speed": 540.925293}

llama_perf_context_print:        load time =      52.15 ms
"""
# Its default markdown table ("|%6s | %6s | %4s | ..." header, "|%6d | %6d | %4d | %6d | %8.3f | ..." rows).
BATCHED_MD = """
|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    32 |     63 |    8 |    760 |    0.261 |   980.84 |    1.130 |   446.02 |    1.391 |   546.37 |
|    32 |     63 |   32 |   3040 |    1.020 |  1003.92 |    3.150 |   640.00 |    4.170 |   729.02 |
"""


def test_the_shapes_are_bench_pys():
    assert (llama_cpp_bench.PROMPT_LEN, llama_cpp_bench.NEW_TOKENS, llama_cpp_bench.PREFILL_LEN) == (
        bench.PROMPT_LEN,
        bench.NEW_TOKENS,
        bench.PREFILL_LEN,
    )


def test_llama_bench_json_gives_prefill_seconds_and_decode_tokens_per_second():
    figures, info = parse_llama_bench_json("build: b3f1c2a0 (6100)\n" + LLAMA_BENCH_JSON)
    assert figures["prefill_512_s"] == pytest.approx([0.6, 0.58])
    assert figures["decode_bs1_tok_s"] == pytest.approx([60.0, 66.3158], rel=1e-5)
    assert info == {"build_commit": "b3f1c2a0", "build_number": 6100, "backends": "CPU", "n_threads": 2} | {
        "flash_attn": False,
        "type_k": "f16",
    }
    with pytest.raises(llama_cpp_bench.LlamaCppError, match="no JSON"):
        parse_llama_bench_json("main: error: failed to load model\n")


@pytest.mark.parametrize("text", [BATCHED_JSONL, BATCHED_MD], ids=["jsonl", "markdown"])
def test_batched_bench_rows_are_read_from_jsonl_or_its_table(text):
    results = parse_batched_bench(text)
    assert [(r["pp"], r["tg"], r["pl"]) for r in results][:1] == [(32, 63, 8)]
    assert results[0]["speed_tg"] == pytest.approx(446.02, abs=0.01)
    assert len(results) == 2


def test_commands_time_bench_pys_shapes_and_repeat_each_batch():
    command = llama_bench_command(Path("llama-bench"), Path("m.gguf"), threads=2, runs=3)
    assert command == ["llama-bench", "-m", "m.gguf", "-p", "512", "-n", "63", "-t", "2", "-r", "3", "-o", "json"]
    command = batched_bench_command(Path("bb"), Path("m.gguf"), threads=2, runs=2, batches=[8, 32])
    assert command[command.index("-npl") + 1] == "8,8,32,32"
    assert command[command.index("-c") + 1] == str(2 * 32 * 96)  # every one of 32 sequences fits 32 + 63 tokens
    assert command[command.index("-npp") + 1 : command.index("-npp") + 4] == ["32", "-ntg", "63"]


def fake_binary(path: Path, stdout: str, code: int = 0) -> Path:
    """A shell script printing ``stdout`` (and a log line on stderr) and exiting with ``code``."""
    path.write_text(
        f"#!/bin/sh\necho 'llama_model_loader: loaded meta data' >&2\ncat <<'EOF'\n{stdout}EOF\nexit {code}\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_measure_maps_both_tools_onto_bench_metrics_and_reports_failures(tmp_path):
    llama = fake_binary(tmp_path / "llama-bench", LLAMA_BENCH_JSON)
    batched = fake_binary(tmp_path / "llama-batched-bench", BATCHED_JSONL)
    assert llama_cpp_bench.batched_bench_next_to(llama) == batched
    result = measure(tmp_path / "m.gguf", llama, batched, threads=2, runs=2, batches=[1, 8])
    metrics = result["metrics"]
    assert metrics["prefill_512_s"]["samples"] == pytest.approx([0.6, 0.58])
    assert metrics["decode_bs8_tok_s"]["samples"] == pytest.approx([446.0177, 438.260864])
    assert result["info"]["build_commit"] == "b3f1c2a0" and "-npl 8,8" in result["info"]["batched_bench"]

    broken = fake_binary(tmp_path / "broken", "", code=1)
    failed = measure(tmp_path / "m.gguf", llama, broken, threads=2, runs=1, batches=[1, 8, 32])["metrics"]
    assert failed["decode_bs1_tok_s"]["samples"]
    assert failed["decode_bs32_tok_s"]["error"] == "broken exited with code 1: llama_model_loader: loaded meta data"
    missing = measure(tmp_path / "m.gguf", tmp_path / "nowhere", None, threads=2, runs=1, batches=[1, 8])["metrics"]
    assert missing["prefill_512_s"]["error"].endswith("nowhere: no such file")
    assert "no llama-batched-bench next to" in missing["decode_bs8_tok_s"]["error"]


def test_bench_converts_each_variant_and_makes_llama_cpp_rows(tmp_path):
    pytest.importorskip("gguf")
    from tools.random_checkpoint import write_checkpoint

    tiny = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    checkpoint = write_checkpoint(tmp_path / "model", "llama-100m", **tiny)
    llama = fake_binary(tmp_path / "llama-bench", LLAMA_BENCH_JSON)
    fake_binary(tmp_path / "llama-batched-bench", BATCHED_MD)
    args = SimpleNamespace(llama_bench=llama, llama_batched_bench=None, threads=2)
    console = SimpleNamespace(print=lambda *a, **k: None)
    rows, notes = bench.measure_llama_cpp(console, args, checkpoint, tmp_path, ["float32", "int4"], 2, [1, 8])
    assert {(r["system"], r["dtype"], r["metric"]) for r in rows} == {
        ("llama_cpp", dtype, metric)
        for dtype in ("float32", "int4")
        for metric in ("prefill_512_s", "decode_bs1_tok_s", "decode_bs8_tok_s")
    }
    assert all(r["median"] for r in rows) and not list(tmp_path.glob("*.gguf"))  # the GGUF files are removed
    assert notes["int4"]["gguf_type"] == "Q4_0" and notes["int4"]["bytes_per_step"] < notes["float32"]["bytes_per_step"]
    assert "Q4_0" in notes["int4"]["summary"]
    json.dumps(rows)  # --json writes them as they are

    args.llama_bench = tmp_path / "missing"
    rows, _ = bench.measure_llama_cpp(console, args, checkpoint, tmp_path, ["bfloat16"], 2, [1, 8])
    assert len(rows) == 3 and all(r["median"] is None and "missing: no such file" in r["error"] for r in rows)


def test_rounds_pool_each_figures_runs_and_keep_an_error_no_round_cleared():
    rounds = [
        bench.make_row("xllm_compiler", "int8", "decode_bs1_tok_s", {"samples": [180.0, 190.0]}),
        bench.make_row("llama_cpp", "int8", "decode_bs1_tok_s", {"error": "not measured"}),
        bench.make_row("xllm_compiler", "int8", "decode_bs1_tok_s", {"samples": [230.0]}),
        bench.make_row("llama_cpp", "int8", "decode_bs1_tok_s", {"error": "-"}),
    ]
    ours, peer = bench.pool_rounds(rounds)
    assert (ours["system"], ours["samples"], ours["median"], ours["min"], ours["max"]) == (
        "xllm_compiler",
        [180.0, 190.0, 230.0],
        190.0,
        180.0,
        230.0,
    )
    assert "error" not in ours
    assert (peer["system"], peer["median"], peer["error"]) == ("llama_cpp", None, "not measured")
