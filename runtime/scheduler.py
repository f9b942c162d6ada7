"""Continuous batching: admit requests while KV blocks last, prefill them together, decode all running.

Each request reserves the blocks for its prompt plus its whole generation when admitted, so a running
sequence can never run out of cache mid-way; requests that do not fit wait for others to finish.
A step's logits go to ``on_logits``, which appends tokens and marks sequences finished.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch

from xllm_compiler.buckets.policy import DECODE, PREFILL
from xllm_compiler.errors import KVCacheExhaustedError
from xllm_compiler.runtime.engine import Engine
from xllm_compiler.runtime.step import Sequence


class Scheduler:
    def __init__(self, engine: Engine, max_prefill_tokens: int, max_prefill_seqs: int):
        self.engine = engine
        self.max_prefill_tokens = max_prefill_tokens
        self.max_prefill_seqs = max_prefill_seqs

    def check_fits(self, seq: Sequence) -> None:
        """Refuse, up front, a request the whole pool could never hold."""
        needed = self.engine.blocks_for(seq.prompt_len + seq.max_new_tokens)
        if needed > self.engine.pool.capacity:
            raise KVCacheExhaustedError(
                f"a request of {seq.prompt_len} prompt + {seq.max_new_tokens} new tokens needs {needed} KV blocks; "
                f"the pool has {self.engine.pool.capacity} (load with more kv_blocks)"
            )

    def _admit(self, waiting: deque[Sequence]) -> list[Sequence]:
        batch: list[Sequence] = []
        tokens = 0
        while waiting:
            seq = waiting[0]
            if batch and (tokens + seq.prompt_len > self.max_prefill_tokens or len(batch) >= self.max_prefill_seqs):
                break
            blocks = self.engine.pool.allocate(self.engine.blocks_for(seq.prompt_len + seq.max_new_tokens))
            if blocks is None:
                break
            seq.blocks = blocks
            batch.append(waiting.popleft())
            tokens += seq.prompt_len
        return batch

    def run(self, seqs: list[Sequence], on_logits: Callable[[list[Sequence], torch.Tensor], None]) -> None:
        for seq in seqs:
            self.check_fits(seq)
        waiting, running = deque(seqs), []
        try:
            while waiting or running:
                batch = self._admit(waiting)
                if batch:
                    running += batch
                    on_logits(batch, self.engine.step(PREFILL, [(s, len(s.tokens) - s.num_computed) for s in batch]))
                elif running:
                    on_logits(running, self.engine.step(DECODE, [(s, 1) for s in running]))
                else:
                    raise KVCacheExhaustedError("no request can be admitted: the KV pool is exhausted")
                self.engine.pool.record_occupancy(sum(s.num_computed for s in running), self.engine.block_size)
                for seq in [s for s in running if s.finished]:
                    self.engine.pool.release(seq.blocks)
                    seq.blocks = []
                running = [s for s in running if not s.finished]
        finally:
            for seq in running:
                self.engine.pool.release(seq.blocks)
                seq.blocks = []
