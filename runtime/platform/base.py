"""What the runtime needs from a device: availability, its torch.device, sync, memory, op lowering."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import fx

from xllm_compiler.runtime.platform.lowering import Lowering, composite_lowering
from xllm_compiler.runtime.replay import RunnerFactory
from xllm_compiler.runtime.weights import PrepareWeight

#: Where a container's memory limit and use are found (cgroup v2, then v1).
CGROUP_MEMORY = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def available_host_memory() -> int:
    """Host memory a new allocation can take: MemAvailable (free memory plus the page cache the kernel
    can drop; MemFree alone undercounts), and no more than the container's cgroup limit leaves."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in CGROUP_MEMORY:
        try:
            limit, usage = Path(limit_file).read_text().strip(), int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit():
            available = min(available, max(0, int(limit) - usage))
        break
    return int(available)


class Platform:
    """A device family. Subclasses import their backend lazily, inside methods, never at import time."""

    name: str = "base"

    def is_available(self) -> bool:
        raise NotImplementedError

    def unavailable_reason(self) -> str:
        return f"device '{self.name}' is not available"

    def device(self) -> torch.device:
        return torch.device(self.name)

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op where execution is synchronous)."""

    def free_memory_bytes(self) -> int:
        """Memory free on the device now."""
        raise NotImplementedError

    def total_memory_bytes(self) -> int:
        """The device's memory, which max_memory_utilization is a share of."""
        raise NotImplementedError

    def lowering(self) -> Lowering:
        """The kernel each ``xllm::`` op runs as here (runtime/platform/lowering.py): what the compiler plans
        memory for and the manifest records; the default, every op as its torch composite."""
        return composite_lowering(self.name)

    def register_kernels(self) -> None:
        """Bind the ``xllm::`` ops to this device's fused kernels, where it has them (idempotent)."""

    def weight_preparer(self, graphs: dict[str, fx.Graph]) -> PrepareWeight | None:
        """The hook runtime/weights.py passes each weight through as it is read, ahead of ``lower``
        (a platform that repacks weights does it there, one tensor at a time); None keeps them as read."""
        return None

    def place_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Move the weights as prepared (in place, same values) to where this device reads them fastest;
        the default leaves them where they were read."""

    def lower(self, graphs: dict[str, fx.Graph], weights: dict[str, torch.Tensor]) -> None:
        """Rewrite loaded graphs (and their weights) in place for this device; the default keeps them."""

    def graph_runner(self) -> RunnerFactory | None:
        """How this device runs a bucket graph: a factory of captured, replayed graphs (runtime/replay.py),
        or None, the default, to run every graph eagerly."""
        return None
