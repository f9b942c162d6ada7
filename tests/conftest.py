"""Shared fixtures: tiny random Hugging Face checkpoints (transformers is the oracle) and compiled artifacts.

The one marker, ``distributed``, is described in tests/README.md.
"""

from __future__ import annotations

import os

import pytest

from tests.hf_oracle import TinyCheckpoints


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> TinyCheckpoints:
    """Builds (and caches for the session) tiny random checkpoints and their compiled artifacts."""
    return TinyCheckpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(autouse=True, scope="session")
def isolated_compile_cache(tmp_path_factory):
    """Every compile in the suite uses a cache folder of its own, never the user's ~/.cache."""
    previous = os.environ.get("XLLM_CACHE_DIR")
    os.environ["XLLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("compile-cache"))
    yield
    if previous is None:
        os.environ.pop("XLLM_CACHE_DIR", None)
    else:
        os.environ["XLLM_CACHE_DIR"] = previous
