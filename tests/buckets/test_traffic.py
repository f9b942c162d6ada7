"""Buckets chosen from traffic: reading a JSONL trace, the optimal choice of k sizes, and --buckets-from end to end."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from pathlib import Path

import pytest

import xllm_compiler
from xllm_compiler.artifact.manifest import read_manifest
from xllm_compiler.buckets import DECODE, PREFILL
from xllm_compiler.buckets.traffic import best_buckets, padded_tokens, padding_fraction, read_trace
from xllm_compiler.cli import main as compile_main
from xllm_compiler.errors import OptionsError
from xllm_compiler.options import DEFAULT_DECODE_BUCKETS, DEFAULT_PREFILL_BUCKETS


def write_trace(path: Path, lines: list) -> Path:
    """Lines are dicts (written as JSON) or raw strings (written as they are)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# -- read_trace ---------------------------------------------------------------------------------------------------


def test_read_trace_accepts_every_key_style_counts_and_blank_lines(tmp_path):
    trace = read_trace(
        write_trace(
            tmp_path / "trace.jsonl",
            [
                {"phase": "prefill", "num_tokens": 183},
                {"phase": "prefill", "prompt_len": 183},
                "",
                "   ",
                {"num_tokens": 7},  # no phase: prefill
                {"phase": "decode", "batch_size": 6},
                {"batch_size": 6},  # no phase, but a batch size: decode
                {"phase": "decode", "num_seqs": 3},
                {"phase": "decode", "num_tokens": 3, "count": 4},
                {"phase": "prefill", "num_tokens": 7, "count": 10},
                {"phase": "decode", "batch_size": 1, "note": "extra keys are ignored"},
            ],
        )
    )
    assert trace.sizes[PREFILL] == Counter({183: 2, 7: 11})
    assert trace.sizes[DECODE] == Counter({6: 2, 3: 5, 1: 1})
    assert trace.total(PREFILL) == 183 * 2 + 7 * 11
    assert trace.total(DECODE) == 6 * 2 + 3 * 5 + 1


def test_read_trace_with_one_phase_only(tmp_path):
    trace = read_trace(write_trace(tmp_path / "t.jsonl", [{"phase": "decode", "batch_size": 2}]))
    assert trace.sizes[DECODE] == Counter({2: 1})
    assert trace.sizes[PREFILL] == Counter()


@pytest.mark.parametrize(
    ("lines", "line_number", "match"),
    [
        (['{"phase": "prefill", "num_tokens": 4}', "{not json"], 2, "expected a JSON object"),
        (['{"phase": "prefill"}'], 1, "expected a JSON object with a phase and a size"),
        (["", '{"phase": "decode", "prompt_len": 4}'], 2, "expected a JSON object"),  # not a decode key
        (['{"phase": "verify", "num_tokens": 4}'], 1, "expected a JSON object"),  # unknown phase
        (["[1, 2]"], 1, "expected a JSON object"),
        (["17"], 1, "expected a JSON object"),
        (['{"phase": "prefill", "num_tokens": 0}'], 1, "size 0 is not a positive integer"),
        (['{"phase": "decode", "batch_size": -3}'], 1, "size -3 is not a positive integer"),
        (['{"phase": "prefill", "num_tokens": 2.5}'], 1, "size 2.5 is not a positive integer"),
        (['{"phase": "prefill", "num_tokens": "8"}'], 1, "is not a positive integer"),
        (['{"phase": "decode", "batch_size": true}'], 1, "is not a positive integer"),
    ],
)
def test_read_trace_names_the_line_of_a_malformed_record(tmp_path, lines, line_number, match):
    path = write_trace(tmp_path / "bad.jsonl", lines)
    with pytest.raises(OptionsError, match=match) as raised:
        read_trace(path)
    assert f"{path}:{line_number}: " in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("count", ['"x"', "null", "-2", "2.5", "true", "[3]"])
def test_read_trace_names_the_line_of_a_malformed_count(tmp_path, count):
    path = write_trace(
        tmp_path / "bad.jsonl", ['{"phase": "prefill", "num_tokens": 4}', "", f'{{"num_tokens": 8, "count": {count}}}']
    )
    with pytest.raises(OptionsError) as raised:
        read_trace(path)
    assert f"{path}:3: " in str(raised.value)


def test_trace_of_zero_counts_has_no_steps(tmp_path):
    path = write_trace(tmp_path / "zero.jsonl", [{"phase": "prefill", "num_tokens": 8, "count": 0}])
    with pytest.raises(OptionsError):
        read_trace(path)


@pytest.mark.parametrize("lines", [[], [""], ["", "  ", "\t"]])
def test_empty_trace_is_refused(tmp_path, lines):
    path = write_trace(tmp_path / "empty.jsonl", lines)
    with pytest.raises(OptionsError, match="has no steps") as raised:
        read_trace(path)
    assert str(path) in str(raised.value)


def test_missing_trace_file_is_an_options_error(tmp_path):
    with pytest.raises(OptionsError, match="cannot read trace"):
        read_trace(tmp_path / "nowhere.jsonl")


# -- best_buckets -----------------------------------------------------------------------------------------------


def brute_force(counts: Counter, k: int, limit: int | None = None) -> int:
    """Least padding of any <= k buckets drawn from the observed sizes (within limit) that cover the largest."""
    sizes = sorted(s for s in counts if limit is None or s <= limit)
    largest = sizes[-1]
    best = None
    for size in range(1, min(k, len(sizes)) + 1):
        for chosen in itertools.combinations(sizes, size):
            if largest in chosen:
                cost = padded_tokens(counts, list(chosen))
                best = cost if best is None else min(best, cost)
    return best


def random_counts(rng: random.Random, max_size: int, distinct: int) -> Counter:
    sizes = rng.sample(range(1, max_size + 1), distinct)
    return Counter({s: rng.randint(1, 20) for s in sizes})


@pytest.mark.parametrize("seed", range(40))
def test_best_buckets_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    counts = random_counts(rng, max_size=rng.choice([8, 64, 600]), distinct=rng.randint(1, 8))
    k = rng.randint(1, 5)
    chosen = best_buckets(counts, k)
    assert chosen == sorted(set(chosen))
    assert 1 <= len(chosen) <= k
    assert set(chosen) <= set(counts)  # the best buckets sit at observed sizes
    assert max(chosen) == max(counts)  # the largest bucket covers every observed step: nothing falls back
    assert padded_tokens(counts, chosen) == brute_force(counts, k)


@pytest.mark.parametrize("seed", range(20))
def test_best_buckets_with_a_limit_is_optimal_and_leaves_larger_sizes_to_the_fallback(seed):
    rng = random.Random(1000 + seed)
    counts = random_counts(rng, max_size=300, distinct=rng.randint(2, 8))
    limit = rng.choice(sorted(counts)[:-1])  # at least one observed size lies above the limit
    k = rng.randint(1, 4)
    chosen = best_buckets(counts, k, limit=limit)
    within = Counter({s: c for s, c in counts.items() if s <= limit})
    assert chosen and max(chosen) == max(within) <= limit
    assert len(chosen) <= k
    assert padded_tokens(counts, chosen) == padded_tokens(within, chosen) == brute_force(counts, k, limit)


def test_best_buckets_simple_cases():
    counts = Counter({1: 100, 2: 50, 3: 10, 4: 40, 8: 5})
    assert best_buckets(counts, 1) == [8]
    assert best_buckets(counts, 5) == [1, 2, 3, 4, 8]
    # Two buckets: 8 must be one of them; 4 closes the heavy group {1..4} cheapest among the others.
    assert padded_tokens(counts, best_buckets(counts, 2)) == brute_force(counts, 2)
    assert best_buckets(Counter(), 3) == []
    assert best_buckets(counts, 0) == []
    # Every size is above the limit: no bucket at all (compile then keeps the default series).
    assert best_buckets(Counter({300: 4, 500: 1}), 3, limit=256) == []


@pytest.mark.parametrize("k", [4, 5, 50])
def test_more_buckets_than_distinct_sizes_gives_one_bucket_per_size(k):
    counts = Counter({3: 2, 17: 9, 40: 1, 41: 3})
    assert best_buckets(counts, k) == [3, 17, 40, 41]
    assert padded_tokens(counts, best_buckets(counts, k)) == 0


def test_best_buckets_never_uses_more_buckets_than_needed():
    assert best_buckets(Counter({5: 7}), 4) == [5]


def test_limit_leaves_big_sizes_to_the_fallback():
    counts = Counter({4: 10, 8: 5, 300: 7, 1000: 1})
    chosen = best_buckets(counts, 3, limit=256)
    assert chosen == [4, 8]
    # Steps above every bucket run unpadded on the fallback graph: no padding charged for them.
    assert padded_tokens(counts, chosen) == 0
    assert best_buckets(counts, 1, limit=256) == [8]
    assert padded_tokens(counts, [8]) == 4 * 10


def test_padding_fraction():
    assert padding_fraction(Counter({3: 2, 8: 1}), [4, 8]) == pytest.approx(2 / 14)
    assert padding_fraction(Counter({3: 1, 10: 1}), [4]) == pytest.approx(1 / 13)  # 10 falls back, unpadded
    assert padding_fraction(Counter({4: 3, 8: 2}), [4, 8]) == 0.0
    assert padding_fraction(Counter(), [4]) == 0.0
    assert padding_fraction(Counter({1: 3}), [16]) == pytest.approx(15.0)  # padding may exceed the real tokens


# -- compile --buckets-from -------------------------------------------------------------------------------------

MAX_SEQ_LEN = 64
TRACE = (
    [{"phase": "prefill", "num_tokens": n, "count": c} for n, c in [(3, 9), (5, 20), (6, 4), (11, 7), (12, 1)]]
    + [{"phase": "prefill", "prompt_len": n, "count": c} for n, c in [(20, 6), (33, 2), (40, 1), (64, 1)]]
    + [{"phase": "prefill", "num_tokens": 200, "count": 3}]  # above max_seq_len: left to the fallback
    + [{"phase": "decode", "batch_size": b, "count": c} for b, c in [(1, 30), (2, 25), (3, 40), (5, 8), (6, 3), (8, 1)]]
)


@pytest.fixture(scope="module")
def tiny_llama(checkpoints):
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM", num_hidden_layers=1)
    return model_dir


@pytest.fixture(scope="module")
def traced_compile(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("traffic")
    trace = write_trace(root / "trace.jsonl", TRACE)
    out = root / "artifact"
    report = xllm_compiler.compile(
        tiny_llama, out, buckets_from=trace, max_seq_len=MAX_SEQ_LEN, cache_dir=str(root / "cache")
    )
    return trace, out, report


def test_compile_from_a_trace_uses_the_best_buckets(traced_compile):
    trace_path, out, report = traced_compile
    trace = read_trace(trace_path)
    manifest = read_manifest(out)
    decode = best_buckets(trace.sizes[DECODE], len(DEFAULT_DECODE_BUCKETS))
    prefill = best_buckets(trace.sizes[PREFILL], len(DEFAULT_PREFILL_BUCKETS), limit=MAX_SEQ_LEN)
    assert [b.num_tokens for b in manifest.buckets if b.phase == DECODE] == decode
    assert [b.num_tokens for b in manifest.buckets if b.phase == PREFILL] == prefill
    assert max(prefill) == 64 and 200 not in prefill
    assert manifest.options.buckets_from == str(trace_path)
    assert {b.bucket.name for b in manifest.buckets} | {"dynamic"} == set(manifest.graph_files())
    assert report == json.loads((out / "report.json").read_text())


def test_report_shows_the_trace_padding_per_phase_and_per_bucket(traced_compile):
    trace_path, _, report = traced_compile
    trace = read_trace(trace_path)
    for phase in (DECODE, PREFILL):
        entry = report["buckets"][phase]
        summary = entry["trace"]
        sizes = [b["num_tokens"] for b in entry["buckets"]]
        assert summary["steps"] == sum(trace.sizes[phase].values())
        assert summary["padding_fraction"] <= summary["default_padding_fraction"]
        assert summary["padding_fraction"] == pytest.approx(padding_fraction(trace.sizes[phase], sizes), abs=1e-5)
        assert sizes == sorted(sizes)
        for bucket in entry["buckets"]:
            assert {"num_tokens", "num_seqs", "seconds", "nodes", "padding_fraction"} <= set(bucket)
            assert bucket["phase"] == phase
            assert bucket["nodes"] > 0 and bucket["seconds"] >= 0
            assert bucket["padding_fraction"] >= 0
    # The default series, cut to max_seq_len: 32, 64 for prefill.
    assert report["buckets"][PREFILL]["trace"]["default_series"] == [32, 64]
    assert report["buckets"][DECODE]["trace"]["default_series"] == list(DEFAULT_DECODE_BUCKETS)


def test_per_bucket_padding_fraction_counts_the_steps_landing_on_it(traced_compile):
    trace_path, _, report = traced_compile
    counts = read_trace(trace_path).sizes[DECODE]
    buckets = report["buckets"][DECODE]["buckets"]
    below = 0
    for bucket in buckets:
        size = bucket["num_tokens"]
        landing = {s: c for s, c in counts.items() if below < s <= size}
        real = sum(s * c for s, c in landing.items())
        padded = sum((size - s) * c for s, c in landing.items())
        assert bucket["padding_fraction"] == pytest.approx(padded / real if real else 0.0, abs=1e-5)
        below = size


def test_trace_with_one_phase_keeps_the_default_buckets_of_the_other(tiny_llama, tmp_path):
    trace = write_trace(tmp_path / "decode.jsonl", [{"batch_size": 3, "count": 5}, {"batch_size": 1}])
    report = xllm_compiler.compile(
        tiny_llama, tmp_path / "out", buckets_from=trace, max_seq_len=MAX_SEQ_LEN, cache_dir=""
    )
    buckets = read_manifest(tmp_path / "out").buckets
    assert [b.num_tokens for b in buckets if b.phase == DECODE] == [1, 3]
    assert [b.num_tokens for b in buckets if b.phase == PREFILL] == [
        s for s in DEFAULT_PREFILL_BUCKETS if s <= MAX_SEQ_LEN
    ]
    assert "trace" in report["buckets"][DECODE]
    assert "trace" not in report["buckets"][PREFILL]


def test_num_buckets_bounds_the_buckets_per_phase(tiny_llama, tmp_path):
    trace = write_trace(tmp_path / "trace.jsonl", TRACE)
    xllm_compiler.compile(
        tiny_llama, tmp_path / "out", buckets_from=trace, num_buckets=2, max_seq_len=MAX_SEQ_LEN, cache_dir=""
    )
    parsed = read_trace(trace)
    buckets = read_manifest(tmp_path / "out").buckets
    decode = [b.num_tokens for b in buckets if b.phase == DECODE]
    prefill = [b.num_tokens for b in buckets if b.phase == PREFILL]
    assert decode == best_buckets(parsed.sizes[DECODE], 2)
    assert prefill == best_buckets(parsed.sizes[PREFILL], 2, limit=MAX_SEQ_LEN)
    assert len(decode) == len(prefill) == 2


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['{"phase": "prefill", "num_tokens": 4}', "oops"], ":2: expected a JSON object"),
        (['{"phase": "decode", "batch_size": 0}'], ":1: size 0 is not a positive integer"),
        ([""], "has no steps"),
    ],
)
def test_cli_buckets_from_a_bad_trace_exits_2_with_one_line(tiny_llama, tmp_path, capsys, lines, expected):
    trace = write_trace(tmp_path / "bad.jsonl", lines)
    out = tmp_path / "out"
    code = compile_main([str(tiny_llama), str(out), "--buckets-from", str(trace), "--quiet", "--no-cache"])
    captured = capsys.readouterr()
    assert code == 2
    lines_out = captured.err.strip().splitlines()
    assert len(lines_out) == 1, captured.err
    assert lines_out[0].startswith("xllm-compile: error: ")
    assert expected in lines_out[0]
    assert "Traceback" not in captured.err
    assert not out.exists() or not any(out.iterdir())


def test_cli_buckets_from_a_trace_with_a_bad_count_exits_2(tiny_llama, tmp_path, capsys):
    trace = write_trace(tmp_path / "bad.jsonl", ['{"phase": "prefill", "num_tokens": 4, "count": "many"}'])
    code = compile_main([str(tiny_llama), str(tmp_path / "out"), "--buckets-from", str(trace), "--quiet", "--no-cache"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{trace}:1: " in err


def test_cli_buckets_from_a_missing_trace_exits_2(tiny_llama, tmp_path, capsys):
    code = compile_main(
        [str(tiny_llama), str(tmp_path / "out"), "--buckets-from", str(tmp_path / "none.jsonl"), "--quiet"]
    )
    assert code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
