"""The engine: runs one step (prefill, decode or both) of several sequences on the right graph and KV cache."""

from __future__ import annotations

import torch

from xllm_compiler.interface import STEP_INPUTS
from xllm_compiler.runtime.graph_cache import GraphCache
from xllm_compiler.runtime.kv_cache import BlockPool, KVCache
from xllm_compiler.runtime.parallel import TensorParallelGroup
from xllm_compiler.runtime.prefix_cache import PrefixCache
from xllm_compiler.runtime.step import Sequence, build_step_inputs


class Engine:
    def __init__(
        self,
        graphs: GraphCache,
        kv_cache: KVCache,
        pool: BlockPool,
        max_seq_len: int,
        device: torch.device,
        group: TensorParallelGroup | None = None,
        prefix_seed: bytes = b"",
    ):
        """``prefix_seed`` seeds the prefix cache's key chain: what identifies this artifact's K/V values
        (runtime/prefix_cache.py). The cache lives here, with the pool, so that it outlives any scheduler."""
        self.graphs = graphs
        self.kv_cache = kv_cache
        self.pool = pool
        self.block_size = kv_cache.block_size
        self.max_blocks_per_seq = -(-max_seq_len // self.block_size)
        self.device = device
        self.group = group or TensorParallelGroup(1, device)
        self.prefix_cache = PrefixCache(pool, self.block_size, prefix_seed)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def hold_blocks(self, seq: Sequence, num_tokens: int) -> bool:
        """Give ``seq`` the blocks its first ``num_tokens`` tokens need, if the pool has them all; False (and
        nothing taken) if not. The one place sequences grow: the scheduler's and a draft model's."""
        needed = self.blocks_for(num_tokens) - len(seq.blocks)
        if needed <= 0:
            return True
        blocks = self.pool.allocate(needed)
        if blocks is None:
            return False
        seq.blocks += blocks
        return True

    def step(self, phase: str, work: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Run ``n`` new tokens of each (sequence, n): the tokens from its ``num_computed`` on, whose blocks it
        already holds. Returns float32 logits [len(work), vocab] on the CPU, row i at the last token of entry i."""
        choice = self.graphs.choose(phase, sum(n for _, n in work), len(work))
        inputs = build_step_inputs(
            work, choice.num_tokens, choice.num_seqs, self.block_size, self.max_blocks_per_seq, self.device
        )
        outputs = self.graphs.runner(choice.graph)(*(inputs[s.name] for s in STEP_INPUTS), *self.kv_cache.layers)
        for seq, count in work:
            seq.num_computed += count
        return outputs[0][: len(work)].float().cpu()
