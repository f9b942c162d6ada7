"""The platform layer: cpu, cuda and npu behind one small interface, each backend imported lazily."""

from __future__ import annotations

from xllm_compiler.errors import DeviceError, OptionsError
from xllm_compiler.runtime.platform.base import Platform
from xllm_compiler.runtime.platform.cpu import CpuPlatform
from xllm_compiler.runtime.platform.cuda import CudaPlatform
from xllm_compiler.runtime.platform.npu import NpuPlatform

PLATFORMS: dict[str, type[Platform]] = {"cpu": CpuPlatform, "cuda": CudaPlatform, "npu": NpuPlatform}
#: What "auto" picks, best first.
AUTO_ORDER = ("npu", "cuda", "cpu")


def get_platform(name: str) -> Platform:
    """The available platform called ``name`` ('auto' picks the best available)."""
    if name == "auto":
        return next(p for p in (PLATFORMS[n]() for n in AUTO_ORDER) if p.is_available())
    device_type = name.split(":")[0]
    if device_type not in PLATFORMS:
        raise OptionsError(f"device '{name}' is not one of auto, {', '.join(PLATFORMS)}")
    platform = PLATFORMS[device_type]()
    if not platform.is_available():
        raise DeviceError(platform.unavailable_reason())
    return platform


__all__ = ["PLATFORMS", "Platform", "get_platform"]
