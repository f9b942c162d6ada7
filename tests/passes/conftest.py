"""Pass tests run tiny graphs many times: build each model graph once, and compute on one thread."""

from __future__ import annotations

import pytest
import torch

from tests.passes.graphs import cached_build_graph
from xllm_compiler import testing


@pytest.fixture(autouse=True)
def _cached_model_graphs(monkeypatch):
    """check_pass's graphs come from the cache of tests.passes.graphs (copies, so tests stay independent)."""
    monkeypatch.setattr(testing, "build_graph", cached_build_graph)


@pytest.fixture(autouse=True)
def _one_thread():
    """On tensors this small, waking a thread pool costs more than the op: SDPA on a 4x8 query takes
    ~8 ms on two threads and ~10 us on one, and paged attention runs it per sequence per layer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
