"""The CPU kernels of cpu_kernels.cpp (fused xllm ops, decode attention) and cpu_linear.cpp (packed
linear layers), built once per machine with torch's extension builder.

Built at first use (about a minute) into torch's extension cache (``$TORCH_EXTENSIONS_DIR``, by
default ~/.cache/torch_extensions) and loaded from there afterwards. The build targets this CPU
(``-march=native``), so the cached build is keyed by the CPU's feature flags as well as the source.
Without a C++ compiler, or with ``XLLM_NATIVE_KERNELS=0``, the ops keep their torch composites and
linear layers stay aten.linear: same results, more time per op.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path
from types import ModuleType

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_kernels.cpp", "cpu_linear.cpp")]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


@functools.cache
def native_kernels() -> ModuleType | None:
    """The compiled kernel module, or None where it cannot be built (then composites are used)."""
    if os.environ.get("XLLM_NATIVE_KERNELS", "1") == "0":
        return None
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES) + _cpu_flags().encode()).hexdigest()[:12]
    try:
        from torch.utils.cpp_extension import load

        return load(
            name=f"xllm_cpu_kernels_{digest}",
            sources=[str(s) for s in SOURCES],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no headers: the composites still work
        warnings.warn(f"xllm_compiler: fused CPU kernels unavailable, using torch composites ({exc})", stacklevel=2)
        return None


def _allocating(out_kernel, outputs: int = 1):
    """A functional form (returns new tensors) of a native out kernel whose outputs are shaped like its
    first input (``outputs`` of them)."""

    def kernel(*args, **kwargs):
        x = args[0] if args else kwargs["x"]
        results = [x.new_empty(x.shape) for _ in range(outputs)]
        out_kernel(*args, *results, **kwargs)
        return results[0] if outputs == 1 else tuple(results)

    return kernel


@functools.cache
def native_cpu_kernels() -> dict:
    """xllm op name -> native kernel, for the ops cpu_kernels.cpp implements (empty if unavailable)."""
    native = native_kernels()
    if native is None:
        return {}

    def silu_and_mul(gate_up):
        out = gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))
        native.silu_and_mul_out(gate_up, out)
        return out

    def rotary_embedding(query, key, cos, sin):
        query_out, key_out = query.new_empty(query.shape), key.new_empty(key.shape)
        native.rotary_embedding_out(query, key, cos, sin, query_out, key_out)
        return query_out, key_out

    return {
        "xllm::rms_norm_out": native.rms_norm_out,
        "xllm::fused_add_rms_norm_out": native.fused_add_rms_norm_out,
        "xllm::silu_and_mul_out": native.silu_and_mul_out,
        "xllm::rotary_embedding_out": native.rotary_embedding_out,
        "xllm::rms_norm": _allocating(native.rms_norm_out),
        "xllm::fused_add_rms_norm": _allocating(native.fused_add_rms_norm_out, outputs=2),
        "xllm::silu_and_mul": silu_and_mul,
        "xllm::rotary_embedding": rotary_embedding,
    }
