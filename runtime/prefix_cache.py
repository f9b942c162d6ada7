"""Prefix caching: full KV blocks keyed by a hash chained over their tokens, so requests that begin alike share them.

A full block's key is sha256(parent key + its token ids), the chain seeded by what identifies the KV values a
token prefix produces here: the artifact's cache key (checkpoint, options, passes) and the sha256 of the weights
this rank reads. The pool is one per loaded artifact, so the seed changes nothing today; it makes a key mean the
same K/V wherever it is seen (a pool shared by several artifacts, keys logged or compared across processes), and
sha256 makes a collision, which would silently give a request another prompt's keys, out of the question.

The cache holds no blocks of its own: a keyed block is held by the sequences using it (``BlockPool`` counts
them), and when the last one lets go it stays keyed and evictable, reclaimed least-recently-released first when
the pool needs it. Only full blocks are keyed, and a sequence computes only past the blocks it matched, so no one
ever writes into a shared block.
"""

from __future__ import annotations

import hashlib
from array import array

from xllm_compiler.runtime.kv_cache import BlockPool


class PrefixCache:
    def __init__(self, pool: BlockPool, block_size: int, seed: bytes = b""):
        self.pool = pool
        self.block_size = block_size
        self._root = hashlib.sha256(b"xllm prefix cache\0" + seed).digest()
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        pool.on_evict = self._forget

    def __len__(self) -> int:
        return len(self._by_hash)

    def block_hash(self, parent: bytes | None, tokens: list[int]) -> bytes:
        """The key of a full block holding ``tokens`` after the block keyed ``parent`` (None: the first block)."""
        return hashlib.sha256((parent or self._root) + array("q", tokens).tobytes()).digest()

    def match(self, tokens: list[int], max_blocks: int) -> tuple[list[int], list[bytes]]:
        """The cached blocks (at most ``max_blocks``) that hold the start of ``tokens``, each now shared by the
        caller (release them as any others), and their keys."""
        blocks: list[int] = []
        hashes: list[bytes] = []
        size = self.block_size
        for i in range(max_blocks):
            key = self.block_hash(hashes[-1] if hashes else None, tokens[i * size : (i + 1) * size])
            block = self._by_hash.get(key)
            if block is None:
                break
            self.pool.share(block)
            blocks.append(block)
            hashes.append(key)
        return blocks, hashes

    def insert(self, key: bytes, block: int) -> None:
        """Key ``block``, now full. A key already cached keeps its block (two sequences computed the same
        prefix at once): the second copy stays private and is freed as usual."""
        if key in self._by_hash or block in self._hash_of:
            return
        self._by_hash[key] = block
        self._hash_of[block] = key
        self.pool.mark_cached(block)

    def _forget(self, block: int) -> None:
        del self._by_hash[self._hash_of.pop(block)]
