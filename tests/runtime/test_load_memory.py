"""A load is sized before anything large is allocated: the KV pool from the memory available, and a plan
that cannot fit refused in load() with the sizes and the options that fix it."""

from __future__ import annotations

import json

import pytest

import xllm_compiler
import xllm_compiler.runtime.loader as loader
from xllm_compiler.artifact.manifest import read_manifest
from xllm_compiler.errors import OptionsError
from xllm_compiler.run import main as run_main
from xllm_compiler.runtime.memory_budget import (
    DEFAULT_UTILIZATION,
    SIZED_BY_BUCKETS,
    SIZED_BY_KV_BLOCKS,
    SIZED_BY_MEMORY,
    blocks_per_sequence,
    kv_block_bytes,
)
from xllm_compiler.runtime.platform.cpu import CpuPlatform

MAX_SEQ_LEN = 64
OPTIONS = dict(decode_buckets=[1, 4], prefill_buckets=[16], max_seq_len=MAX_SEQ_LEN, cache_dir="")


@pytest.fixture(scope="module")
def artifact(checkpoints):
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    return checkpoints.artifact(model_dir, **OPTIONS)


@pytest.fixture(scope="module")
def sizes(artifact):
    """(weights + arena bytes, bytes of one full-length sequence's KV blocks, bytes of one block)."""
    manifest = read_manifest(artifact)
    arena = xllm_compiler.load(artifact).memory_stats()["arena_bytes"]
    block = kv_block_bytes(manifest)
    return manifest.weight_bytes + arena, blocks_per_sequence(manifest) * block, block


@pytest.fixture
def available(monkeypatch):
    """Pretend the machine has ``n`` bytes available now."""

    def pretend(n: int) -> None:
        monkeypatch.setattr(CpuPlatform, "free_memory_bytes", lambda self: int(n))

    return pretend


@pytest.fixture
def no_large_allocation(monkeypatch):
    """Reading the weights or allocating the KV cache fails the test: a refusal must come before both."""

    def refuse(*args, **kwargs):
        raise AssertionError("load() read weights or allocated the KV cache before refusing the plan")

    monkeypatch.setattr(loader, "_read_weights", refuse)
    monkeypatch.setattr(loader, "KVCache", refuse)


def test_default_pool_holds_the_largest_decode_bucket_when_it_fits(artifact, sizes, available):
    fixed, sequence, _ = sizes
    available((fixed + 10 * sequence) / DEFAULT_UTILIZATION)
    stats = xllm_compiler.load(artifact).memory_stats()
    assert stats["kv_pool_sized_by"] == SIZED_BY_BUCKETS
    assert stats["kv_blocks_total"] == 4 * blocks_per_sequence(read_manifest(artifact))


def test_default_pool_shrinks_to_the_sequences_that_fit(artifact, sizes, available):
    fixed, sequence, block = sizes
    available((fixed + 2.5 * sequence + block) / DEFAULT_UTILIZATION)
    model = xllm_compiler.load(artifact)
    stats = model.memory_stats()
    assert stats["kv_pool_sized_by"] == SIZED_BY_MEMORY
    assert stats["kv_blocks_total"] == 2 * blocks_per_sequence(read_manifest(artifact))
    # Four prompts still run: the scheduler waits for blocks instead of failing.
    outputs = model.generate([[1, 2, 3]] * 4, max_new_tokens=4, ignore_eos=True)
    assert [len(o) for o in outputs] == [4] * 4


def test_a_pool_without_room_for_one_sequence_is_refused_before_any_large_allocation(
    artifact, sizes, available, no_large_allocation
):
    fixed, sequence, _ = sizes
    available((fixed + 0.5 * sequence) / DEFAULT_UTILIZATION)
    with pytest.raises(OptionsError) as info:
        xllm_compiler.load(artifact)
    message = str(info.value)
    for needle in (f"one {MAX_SEQ_LEN}-token sequence", "KiB", "weights", "arena", "--kv-blocks"):
        assert needle in message, message
    assert "--max-memory-utilization" in message and "--max-seq-len" in message


def test_explicit_kv_blocks_beyond_the_memory_are_refused_naming_the_sizes(artifact, no_large_allocation):
    need = r"kv_blocks 1000000000 need [\d.]+ [KMGT]iB of KV cache .* at most \d+ blocks fit"
    with pytest.raises(OptionsError, match=need):
        xllm_compiler.load(artifact, kv_blocks=10**9)


def test_explicit_kv_blocks_that_fit_are_taken(artifact):
    stats = xllm_compiler.load(artifact, kv_blocks=9).memory_stats()
    assert stats["kv_pool_sized_by"] == SIZED_BY_KV_BLOCKS and stats["kv_blocks_total"] == 8


def test_xllm_run_refuses_an_oversized_pool_in_one_line(artifact, capsys):
    assert run_main([str(artifact), "--prompt-ids", "1,2", "--kv-blocks", str(10**9)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kv_blocks" in err[0] and "GiB" in err[0], err


def test_the_report_says_what_a_load_takes(artifact):
    report = json.loads((artifact / "report.json").read_text())
    memory = report["load_memory"]
    manifest = read_manifest(artifact)
    assert memory["weight_bytes"] == manifest.weight_bytes
    assert memory["arena_bytes"] == max(m["arena_bytes"] for m in report["memory"].values())
    assert memory["kv_bytes_per_sequence"] == memory["kv_bytes_per_token"] * MAX_SEQ_LEN
    assert memory["total_bytes"] == memory["weight_bytes"] + memory["arena_bytes"] + memory["kv_bytes"]
    assert memory["fits_this_machine"] is True and "warnings" not in report


def test_a_compile_warns_when_its_plan_cannot_fit_this_machine(checkpoints, tmp_path, available):
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    available(1 << 10)
    report = xllm_compiler.compile(model_dir, tmp_path / "out", **OPTIONS)
    assert report["load_memory"]["fits_this_machine"] is False, report["load_memory"]
    (warning,) = report["warnings"]
    assert "a load on this machine will fail" in warning and "--max-seq-len" in warning


def test_a_utilization_beyond_the_available_memory_is_refused(artifact, sizes, available, no_large_allocation):
    fixed, sequence, _ = sizes
    available(fixed + sequence)  # total memory is this machine's: half of it is far more than that
    with pytest.raises(OptionsError, match=r"max_memory_utilization 0.5 asks for .* available"):
        xllm_compiler.load(artifact, max_memory_utilization=0.5)
