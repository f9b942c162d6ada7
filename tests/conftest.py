"""Shared fixtures: tiny random Hugging Face checkpoints (transformers is the oracle) and compiled artifacts.

The markers (``distributed``, ``gpu``, ``npu``) are described in tests/README.md; ``gpu`` and ``npu`` tests
are skipped where that device is not available.
"""

from __future__ import annotations

import os

import pytest

from tests.hf_oracle import TinyCheckpoints
from xllm_compiler.runtime.platform import PLATFORMS

#: Device markers and the platform each needs (runtime/platform: the runtime's own availability check).
DEVICE_MARKERS = {"gpu": "cuda", "npu": "npu"}


def pytest_collection_modifyitems(config, items):
    """Skip a ``gpu``/``npu`` test where its device is absent; a platform is asked only if a test needs it."""
    reasons: dict[str, str | None] = {}
    for item in items:
        for marker, device in DEVICE_MARKERS.items():
            if item.get_closest_marker(marker) is None:
                continue
            if marker not in reasons:
                platform = PLATFORMS[device]()
                reasons[marker] = None if platform.is_available() else platform.unavailable_reason()
            if reasons[marker] is not None:
                item.add_marker(pytest.mark.skip(reason=reasons[marker]))


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
