"""The CPU kernels of cpu_kernels.cpp (fused xllm ops, decode attention), cpu_linear.cpp (packed
linear layers), cpu_quant.cpp (int8-weight linear layers), cpu_int4.cpp (int4-weight ones) and
cpu_moe_routing.cpp, with cpu_replay.cpp's ReplayProgram that runs a bucket graph's recorded calls
(runtime/cpu_replay.py), built once per machine with torch's extension builder.

The build takes one to two minutes on two cores (3 min of CPU time), so the first compile for the cpu
platform does it (its "kernels" stage); a load that still finds no build says so on stderr before it
starts. It lives in torch's extension cache, one folder per build: ``$TORCH_EXTENSIONS_DIR/<name>``, by
default ``~/.cache/torch_extensions/py<version>_cpu/<name>``, where ``<name>`` is ``xllm_cpu_kernels_``
and a hash of the sources and this CPU's feature flags (the build targets this CPU, ``-march=native``),
so a changed source or another CPU gets a build of its own. ``build_directory()`` names it;
``is_built()`` says whether it is there without building. Without a C++ compiler, or with
``XLLM_NATIVE_KERNELS=0``, the ops keep their torch composites and linear layers stay aten.linear: same
results, more time per op.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from filelock import FileLock

SOURCES = [
    Path(__file__).with_name(name)
    for name in (
        "cpu_kernels.cpp",
        "cpu_linear.cpp",
        "cpu_quant.cpp",
        "cpu_int4.cpp",
        "cpu_moe_routing.cpp",
        "cpu_replay.cpp",
    )
]
#: Included by the sources: part of what a build is keyed by, not compiled on their own.
HEADERS = [Path(__file__).with_name(name) for name in ("cpu_avx2.h", "cpu_avx512.h", "cpu_replay.h")]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


#: The compile stage's line while it builds (CompileReport stage "kernels").
BUILD_DESCRIPTION = "Building the CPU kernels (first run on this machine only, one to two minutes)"


def enabled() -> bool:
    """Whether the native kernels may be used at all (``XLLM_NATIVE_KERNELS=0`` says no)."""
    return os.environ.get("XLLM_NATIVE_KERNELS", "1") != "0"


def extension_name() -> str:
    """The build's name: keyed by the sources and the CPU's flags, as ``-march=native`` depends on both."""
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in [*SOURCES, *HEADERS]) + _cpu_flags().encode()).hexdigest()[
        :12
    ]
    return f"xllm_cpu_kernels_{digest}"


def build_directory() -> Path:
    """Where torch builds (or has built) these kernels; honours ``$TORCH_EXTENSIONS_DIR``."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(extension_name(), verbose=False))


def is_built() -> bool:
    """Whether a finished build is cached, checked without building: torch writes the library last."""
    from torch.utils.cpp_extension import LIB_EXT

    return (build_directory() / f"{extension_name()}{LIB_EXT}").is_file()


def needs_build() -> bool:
    """Whether using the kernels now would first build them (one to two minutes)."""
    return enabled() and not is_built()


@contextlib.contextmanager
def exclusive_build(directory: Path) -> Iterator[None]:
    """Hold the build of ``directory`` alone, and clear what a killed build left behind.

    torch's builder serialises builds with a plain ``lock`` file in the build folder and waits, silently and
    for ever, while one exists; a build killed part-way (an interrupted compile, a killed CI job) leaves it
    behind. Ours is an flock beside the folder, which the kernel releases when its holder dies: whoever holds
    it is the only builder of ours, so a ``lock`` file found then is stale and is removed.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory.parent / f"{directory.name}.flock")):
        (directory / "lock").unlink(missing_ok=True)
        yield


@functools.cache
def native_kernels() -> ModuleType | None:
    """The compiled kernel module, or None where it cannot be built (then composites are used)."""
    if not enabled():
        return None
    if not is_built():
        print(
            f"xllm_compiler: building the CPU kernels into {build_directory()} (once per machine, one to two minutes; "
            "XLLM_NATIVE_KERNELS=0 skips them)",
            file=sys.stderr,
            flush=True,
        )
    try:
        from torch.utils.cpp_extension import load

        with exclusive_build(build_directory()):
            return load(
                name=extension_name(),
                sources=[str(s) for s in SOURCES],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
    except Exception as exc:  # no compiler, no headers: the composites still work
        warnings.warn(f"xllm_compiler: fused CPU kernels unavailable, using torch composites ({exc})", stacklevel=2)
        return None


def build_kernels() -> bool:
    """Build the kernels now if they are missing (the compile's "kernels" stage); whether they are usable."""
    return native_kernels() is not None


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
