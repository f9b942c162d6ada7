"""Fixtures shared by the runtime tests: one tiny Llama checkpoint and its artifact with deliberately small
buckets (decode 1, 2; prefill 16), so that ordinary requests overflow them and exercise the fallback graph."""

from __future__ import annotations

import pytest

import xllm_compiler

#: Small buckets: a batch of 3+ sequences or a prompt of 17+ tokens does not fit any of them.
SMALL_BUCKETS = dict(decode_buckets=[1, 2], prefill_buckets=[16], max_seq_len=128)


@pytest.fixture(scope="session")
def llama(checkpoints):
    """(model_dir, hf_model) of the tiny random Llama the parity tests use too."""
    return checkpoints.checkpoint("LlamaForCausalLM")


@pytest.fixture(scope="session")
def small_artifact(checkpoints, llama):
    model_dir, _ = llama
    return checkpoints.artifact(model_dir, **SMALL_BUCKETS)


@pytest.fixture(scope="session")
def small_model(small_artifact):
    """One loaded model for tests that only read outputs (tests that read stats() load their own)."""
    return xllm_compiler.load(small_artifact)
