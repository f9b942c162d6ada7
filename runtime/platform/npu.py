"""Ascend NPU through torch_npu (an optional extra: ``pip install xllm-compiler[npu]``).

torch_npu is imported only when this platform is used. ``register_kernels`` binds our ``xllm::`` ops
to torch_npu's fused kernels for the "npu" device:

    xllm::rms_norm            -> torch_npu.npu_rms_norm(x, gamma, epsilon)[0]
    xllm::fused_add_rms_norm  -> torch_npu.npu_add_rms_norm(x1, x2, gamma, epsilon) -> (y, rstd, x1 + x2)
    xllm::silu_and_mul        -> torch_npu.npu_swiglu(gate_up, dim=-1)
    xllm::rotary_embedding    -> torch_npu.npu_rotary_mul on [1, T, heads, D] (BSND) with cos/sin [1, T, 1, D]
    xllm::write_kv_cache      -> torch_npu._npu_reshape_and_cache(key, value, key_cache, value_cache, slots)

``xllm::paged_attention`` keeps its torch composite on NPU for now (its cache write goes through
the kernel above); a fused NPU attention kernel (npu_fused_infer_attention_score) is future work.

Untested here: the project's machines have no NPU, so no result on an NPU is claimed anywhere in this
repository, and these mappings follow torch_npu's documented signatures only.
"""

from __future__ import annotations

import importlib

import torch

from xllm_compiler.runtime.platform.base import Platform

_registered = False


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
        return int(torch.npu.mem_get_info()[0])

    def total_memory_bytes(self) -> int:
        return int(torch.npu.mem_get_info()[1])

    def register_kernels(self) -> None:
        global _registered
        if _registered:
            return
        npu = self._torch_npu()

        def rms_norm(x, weight, eps):
            return npu.npu_rms_norm(x, weight, epsilon=eps)[0]

        def fused_add_rms_norm(x, residual, weight, eps):
            y, _rstd, summed = npu.npu_add_rms_norm(x, residual, weight, eps)
            return y, summed

        def silu_and_mul(gate_up):
            return npu.npu_swiglu(gate_up, dim=-1)

        def rotary_embedding(query, key, cos, sin):
            cos4, sin4 = cos.unsqueeze(0), sin.unsqueeze(0)
            q = npu.npu_rotary_mul(query.unsqueeze(0), cos4, sin4).squeeze(0)
            k = npu.npu_rotary_mul(key.unsqueeze(0), cos4, sin4).squeeze(0)
            return q, k

        def write_kv_cache(key, value, kv_cache, slot_mapping):
            npu._npu_reshape_and_cache(
                key=key, value=value, key_cache=kv_cache[0], value_cache=kv_cache[1], slot_indices=slot_mapping.int()
            )

        for name, kernel in {
            "xllm::rms_norm": rms_norm,
            "xllm::fused_add_rms_norm": fused_add_rms_norm,
            "xllm::silu_and_mul": silu_and_mul,
            "xllm::rotary_embedding": rotary_embedding,
            "xllm::write_kv_cache": write_kv_cache,
        }.items():
            torch.library.register_kernel(name, "npu", kernel)
        _registered = True
