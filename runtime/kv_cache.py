"""The paged KV cache: one tensor of fixed-size blocks for all layers, and the pool that hands them out.

The cache tensor is allocated once, [layers, planes, num_blocks, block_size, kv_heads, head_dim] (planes: K
and V, or MLA's one latent row); every
graph call sees the same per-layer views, so their addresses never move. Block 0 is reserved for
padding tokens and never handed out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from xllm_compiler.interface import KV_PLANES, RESERVED_BLOCKS


@dataclass(frozen=True)
class BlockPoolStats:
    total: int
    used: int  # blocks some sequence holds
    free: int  # blocks an allocation can take: never used, released, or held only by the prefix cache
    peak_used: int
    fragmentation: float  # share of the slots in used blocks that hold no token (now)
    peak_fragmentation: float  # the largest such share seen at any step
    cached: int = 0  # of ``free``: released blocks whose contents the prefix cache still keys


class BlockPool:
    """Allocator of KV blocks with reference counts; all-or-nothing allocation, so a step never half-fits.

    A block is held by every sequence that uses it (prefix sharing, ``share``) and freed when the last one
    releases it. A freed block the prefix cache keys (``mark_cached``) keeps its contents: it waits in a
    least-recently-released queue and is only reclaimed, oldest first, when no never-cached block is free;
    ``on_evict(block)`` then tells the cache to forget it.

    Blocks never handed out before leave the free list in ascending order (released blocks are reused
    first), so the blocks a workload has touched are always the range below a high-water mark:
    ``on_first_use(start, stop)`` is told whenever that range grows.
    """

    def __init__(self, num_blocks: int, on_first_use: Callable[[int, int], None] | None = None):
        if num_blocks <= RESERVED_BLOCKS:
            raise ValueError(f"a KV pool needs more than {RESERVED_BLOCKS} blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, RESERVED_BLOCKS - 1, -1))
        self._refs = [0] * num_blocks
        self._cached: set[int] = set()  # blocks whose contents the prefix cache keys
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first
        self.on_evict: Callable[[int], None] | None = None
        self._on_first_use = on_first_use
        self._first_unused = RESERVED_BLOCKS
        self._used = 0
        self._peak = 0
        self._fragmentation = 0.0
        self._peak_fragmentation = 0.0

    @property
    def capacity(self) -> int:
        return self.num_blocks - RESERVED_BLOCKS

    def num_free(self) -> int:
        """Blocks an allocation can take now (evicting cached ones if it must)."""
        return len(self._free) + len(self._evictable)

    def num_cached(self) -> int:
        """Blocks nobody holds whose contents the prefix cache still keys."""
        return len(self._evictable)

    def allocate(self, count: int) -> list[int] | None:
        """``count`` blocks, each held once, or None (and nothing taken) if fewer are free."""
        if count > self.num_free():
            return None
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                self._cached.discard(block)
                if self.on_evict is not None:
                    self.on_evict(block)
            self._refs[block] = 1
            blocks.append(block)
        self._hold(count)
        top = max(blocks, default=-1)
        if top >= self._first_unused:
            if self._on_first_use is not None:
                self._on_first_use(self._first_unused, top + 1)
            self._first_unused = top + 1
        return blocks

    def share(self, block: int) -> None:
        """One more holder of ``block`` (a cached prefix block); it leaves the eviction queue if it was in it."""
        if self._refs[block] == 0:
            del self._evictable[block]
            self._hold(1)
        self._refs[block] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one hold on each block. Released in reverse so that, of a sequence's cached blocks, the
        last (the least likely to be shared: every match needs the ones before it) is evicted first."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            self._used -= 1
            if block in self._cached:
                self._evictable[block] = None
            else:
                self._free.append(block)
        if self._used == 0:
            self._fragmentation = 0.0

    def refs(self, block: int) -> int:
        return self._refs[block]

    def mark_cached(self, block: int) -> None:
        """The prefix cache keys ``block``'s contents (a full block): keep them when it is released."""
        self._cached.add(block)

    def _hold(self, count: int) -> None:
        self._used += count
        self._peak = max(self._peak, self._used)

    def record_occupancy(self, empty_slots: int, block_size: int) -> None:
        """After a step: ``empty_slots`` slots of the used blocks hold no token. Blocks are fixed-size, so the
        pool never fragments between blocks; what it wastes is the unfilled tail of each sequence's last block
        (blocks grow with the sequences, and only full blocks are shared)."""
        slots = self._used * block_size
        self._fragmentation = empty_slots / slots if slots else 0.0
        self._peak_fragmentation = max(self._peak_fragmentation, self._fragmentation)

    def stats(self) -> BlockPoolStats:
        return BlockPoolStats(
            total=self.capacity,
            used=self._used,
            free=self.num_free(),
            peak_used=self._peak,
            fragmentation=round(self._fragmentation, 4),
            peak_fragmentation=round(self._peak_fragmentation, 4),
            cached=len(self._evictable),
        )


class KVCache:
    """The cache tensor and its per-layer views.

    The tensor is allocated uninitialised and a block is zeroed when the pool first hands it out
    (``zero_blocks``): on CPU the pages of a block no request reached are never touched, so the pool
    costs resident memory only for what a workload uses, not for its full capacity (with prefix caching
    that grows towards the whole pool: released blocks keep their contents while untouched ones are free).
    Zeroing still matters: a batched decode attention reads (masked-out) slots past a sequence's length, and
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
        planes: int = KV_PLANES,
    ):
        self.block_size = block_size
        self.tensor = torch.empty(
            num_layers, planes, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )
        self.layers = list(self.tensor.unbind(0))
        self.zero_blocks(0, RESERVED_BLOCKS)

    def zero_blocks(self, start: int, stop: int) -> None:
        self.tensor[:, :, start:stop].zero_()

    @staticmethod
    def bytes_per_block(
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        planes: int = KV_PLANES,
    ) -> int:
        return num_layers * planes * block_size * num_kv_heads * head_dim * dtype.itemsize

    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()
