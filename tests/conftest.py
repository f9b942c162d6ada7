"""Shared fixtures: tiny random Hugging Face checkpoints (transformers is the oracle) and compiled artifacts.

Markers: ``slow`` runs only with --runslow or XLLM_RUN_SLOW=1; ``distributed``, ``gpu`` and ``npu``
are described in tests/README.md.
"""

from __future__ import annotations

import os

import pytest

from tests.hf_oracle import TinyCheckpoints


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("XLLM_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or XLLM_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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
