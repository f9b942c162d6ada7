"""The paged KV cache: one tensor of fixed-size blocks for all layers, and the pool that hands them out.

The cache tensor is allocated once, [layers, 2, num_blocks, block_size, kv_heads, head_dim]; every
graph call sees the same per-layer views, so their addresses never move. Block 0 is reserved for
padding tokens and never handed out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xllm_compiler.interface import RESERVED_BLOCKS


@dataclass(frozen=True)
class BlockPoolStats:
    total: int
    used: int
    free: int
    peak_used: int


class BlockPool:
    """Free-list allocator of KV blocks; all-or-nothing allocation, so a request never half-fits."""

    def __init__(self, num_blocks: int):
        if num_blocks <= RESERVED_BLOCKS:
            raise ValueError(f"a KV pool needs more than {RESERVED_BLOCKS} blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, RESERVED_BLOCKS - 1, -1))
        self._peak = 0

    @property
    def capacity(self) -> int:
        return self.num_blocks - RESERVED_BLOCKS

    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int] | None:
        """``count`` blocks, or None (and nothing taken) if fewer are free."""
        if count > len(self._free):
            return None
        blocks = [self._free.pop() for _ in range(count)]
        self._peak = max(self._peak, self.capacity - len(self._free))
        return blocks

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def stats(self) -> BlockPoolStats:
        used = self.capacity - len(self._free)
        return BlockPoolStats(total=self.capacity, used=used, free=len(self._free), peak_used=self._peak)


class KVCache:
    """The cache tensor and its per-layer views."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.block_size = block_size
        self.tensor = torch.zeros(
            num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )
        self.layers = list(self.tensor.unbind(0))

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize

    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()
