"""Verify buckets (speculative decoding): decode-shaped graphs for s·(k+1) rows, recorded with their k."""

from __future__ import annotations

import pytest

import xllm_compiler
from xllm_compiler.buckets import DECODE, VERIFY, Bucket, make_buckets
from xllm_compiler.errors import OptionsError
from xllm_compiler.options import make_options

TINY_LLAMA_OPTIONS = dict(decode_buckets=[1, 2], prefill_buckets=[16], max_seq_len=64)


def test_verify_sizes_are_decode_sizes_times_k_plus_one_less_the_decode_ones():
    buckets = make_buckets((1, 2, 4, 8), (32,), 64, explicit_prefill=True, num_speculative_tokens=3)
    assert [b for b in buckets if b.phase == VERIFY] == [Bucket(VERIFY, 16, 16), Bucket(VERIFY, 32, 32)]
    assert [b.num_tokens for b in buckets if b.phase == DECODE] == [1, 2, 4, 8]
    assert not [b for b in make_buckets((1, 2), (32,), 64, explicit_prefill=True) if b.phase == VERIFY]


def test_negative_k_is_refused():
    with pytest.raises(OptionsError, match="num_speculative_tokens"):
        make_options(num_speculative_tokens=-1)


def test_the_artifact_records_k_and_its_verify_buckets(checkpoints, tmp_path):
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    report = xllm_compiler.compile(
        model_dir, tmp_path / "a", num_speculative_tokens=2, cache_dir="", **TINY_LLAMA_OPTIONS
    )
    model = xllm_compiler.load(tmp_path / "a")
    assert model.manifest.num_speculative_tokens == 2
    assert sorted(b.num_tokens for b in model.manifest.buckets if b.phase == VERIFY) == [3, 6]
    assert [b["num_tokens"] for b in report["buckets"][VERIFY]["buckets"]] == [3, 6]
    plain = xllm_compiler.compile(model_dir, tmp_path / "b", cache_dir="", **TINY_LLAMA_OPTIONS)
    assert plain["cache"]["key"] != report["cache"]["key"]
