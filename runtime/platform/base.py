"""What the runtime needs from a device: availability, its torch.device, sync, memory, op lowering."""

from __future__ import annotations

import torch
from torch import fx


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

    def register_kernels(self) -> None:
        """Bind the ``xllm::`` ops to this device's fused kernels, where it has them (idempotent)."""

    def lower(self, graphs: dict[str, fx.Graph], weights: dict[str, torch.Tensor]) -> None:
        """Rewrite loaded graphs (and their weights) in place for this device; the default keeps them."""
