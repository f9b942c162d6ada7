"""Ascend NPU through torch_npu (an optional extra: ``pip install xllm-compiler[npu]``).

torch_npu is imported only when this platform is used. Untested here: the project's machines have no
NPU, so no result on an NPU is claimed anywhere in this repository.
"""

from __future__ import annotations

import importlib

import torch

from xllm_compiler.runtime.platform.base import Platform


class NpuPlatform(Platform):
    name = "npu"

    def _torch_npu(self):
        return importlib.import_module("torch_npu")

    def is_available(self) -> bool:
        try:
            self._torch_npu()
        except ImportError:
            return False
        return bool(torch.npu.is_available())

    def unavailable_reason(self) -> str:
        try:
            self._torch_npu()
        except ImportError:
            return "device 'npu' needs torch_npu, which is not installed (pip install xllm-compiler[npu])"
        return "device 'npu' is not available (torch_npu found no Ascend device)"

    def synchronize(self) -> None:
        torch.npu.synchronize()

    def free_memory_bytes(self) -> int:
        free, _total = torch.npu.mem_get_info()
        return int(free)
