"""The paged KV cache: one tensor of fixed-size blocks for all layers, and the pool that hands them out.

The cache tensor is allocated once, [layers, 2, num_blocks, block_size, kv_heads, head_dim]; every
graph call sees the same per-layer views, so their addresses never move. Block 0 is reserved for
padding tokens and never handed out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from xllm_compiler.interface import RESERVED_BLOCKS


@dataclass(frozen=True)
class BlockPoolStats:
    total: int
    used: int
    free: int
    peak_used: int
    fragmentation: float  # share of the slots in used blocks that hold no token (now)
    peak_fragmentation: float  # the largest such share seen at any step


class BlockPool:
    """Free-list allocator of KV blocks; all-or-nothing allocation, so a request never half-fits.

    Blocks never handed out before leave the free list in ascending order (released blocks are reused
    first), so the blocks a workload has touched are always the range below a high-water mark:
    ``on_first_use(start, stop)`` is told whenever that range grows.
    """

    def __init__(self, num_blocks: int, on_first_use: Callable[[int, int], None] | None = None):
        if num_blocks <= RESERVED_BLOCKS:
            raise ValueError(f"a KV pool needs more than {RESERVED_BLOCKS} blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, RESERVED_BLOCKS - 1, -1))
        self._on_first_use = on_first_use
        self._first_unused = RESERVED_BLOCKS
        self._peak = 0
        self._fragmentation = 0.0
        self._peak_fragmentation = 0.0

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
        top = max(blocks, default=-1)
        if top >= self._first_unused:
            if self._on_first_use is not None:
                self._on_first_use(self._first_unused, top + 1)
            self._first_unused = top + 1
        return blocks

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        if len(self._free) == self.capacity:
            self._fragmentation = 0.0

    def record_occupancy(self, tokens: int, block_size: int) -> None:
        """After a step: ``tokens`` cached tokens live in the used blocks. Blocks are fixed-size, so the
        pool never fragments between blocks; what it wastes is the slots reserved inside them (a
        request reserves its whole generation when admitted, and a last block is partly filled)."""
        slots = (self.capacity - len(self._free)) * block_size
        self._fragmentation = 1.0 - tokens / slots if slots else 0.0
        self._peak_fragmentation = max(self._peak_fragmentation, self._fragmentation)

    def stats(self) -> BlockPoolStats:
        used = self.capacity - len(self._free)
        return BlockPoolStats(
            total=self.capacity,
            used=used,
            free=len(self._free),
            peak_used=self._peak,
            fragmentation=round(self._fragmentation, 4),
            peak_fragmentation=round(self._peak_fragmentation, 4),
        )


class KVCache:
    """The cache tensor and its per-layer views.

    The tensor is allocated uninitialised and a block is zeroed when the pool first hands it out
    (``zero_blocks``): on CPU the pages of a block no request reached are never touched, so the pool
    costs resident memory only for what a workload uses, not for its full capacity. Zeroing still
    matters: a batched decode attention reads (masked-out) slots past a sequence's length, and
    uninitialised bits there could be NaN, which a zero probability does not cancel.
    """

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
        self.tensor = torch.empty(
            num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )
        self.layers = list(self.tensor.unbind(0))
        self.zero_blocks(0, RESERVED_BLOCKS)

    def zero_blocks(self, start: int, stop: int) -> None:
        self.tensor[:, :, start:stop].zero_()

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize

    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()
