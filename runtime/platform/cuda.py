"""CUDA: torch's CUDA backend; ``xllm::`` ops use their torch composites (SDPA picks flash/mem-efficient).

Bucket graphs are captured as CUDA graphs on first use and replayed (runtime/replay.py); the dynamic
fallback graph runs eagerly. ``XLLM_GRAPH_REPLAY=0`` runs every graph eagerly.

Not exercised on this project's CPU-only CI machines: nothing here has been measured on a GPU unless
a closing note says so.
"""

from __future__ import annotations

import torch

from xllm_compiler.runtime.platform.base import Platform
from xllm_compiler.runtime.replay import RunnerFactory, cuda_graph_runners


class CudaPlatform(Platform):
    name = "cuda"

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def unavailable_reason(self) -> str:
        return "device 'cuda' is not available (this torch build has no CUDA, or no GPU is visible)"

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def free_memory_bytes(self) -> int:
        return int(torch.cuda.mem_get_info()[0])

    def total_memory_bytes(self) -> int:
        return int(torch.cuda.mem_get_info()[1])

    def graph_runner(self) -> RunnerFactory:
        return cuda_graph_runners()
