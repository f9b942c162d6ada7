"""CPU: always available; the ``xllm::`` ops run their torch-composite reference kernels."""

from __future__ import annotations

import os

from xllm_compiler.runtime.platform.base import Platform


class CpuPlatform(Platform):
    name = "cpu"

    def is_available(self) -> bool:
        return True

    def free_memory_bytes(self) -> int:
        pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
        return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else 8 << 30
