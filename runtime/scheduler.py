"""The step-level scheduler: requests join and leave between any two steps; each step mixes decode and prefill.

Every ``step()`` first gives one token to each running sequence that has one token left to compute (a decode),
then fills the rest of the token budget with prefill chunks, FIFO: sequences part-way through their prompt,
then waiting requests. A prompt longer than the budget is prefilled over several steps while the others keep
decoding; a chunk that stops short of a sequence's last token samples nothing (its logits row is dropped).

KV blocks are allocated as sequences grow. When the pool runs dry the newest running sequence is preempted: its
blocks go back, its generated tokens stay, and it waits at the front of the queue to be recomputed (the prefix
cache usually still holds most of its blocks). Greedy results do not depend on any of this.

The defaults keep steps inside the artifact's buckets: at most the largest decode bucket's sequences and the
largest prefill bucket's tokens per step, and a prefill bucket of t tokens holds min(t, largest decode batch)
sequences (buckets/policy.py), so a mixed step fits a prefill bucket. One scheduler drives a pool at a time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import torch

from xllm_compiler.buckets.policy import DECODE, PREFILL, VERIFY
from xllm_compiler.errors import KVCacheExhaustedError, OptionsError, RequestError
from xllm_compiler.runtime.engine import Engine
from xllm_compiler.runtime.requests import ABORT, LENGTH, STOP, Request, RequestOutput
from xllm_compiler.runtime.sampling import sample_rows
from xllm_compiler.runtime.speculative import Speculator, accept, verify_rows
from xllm_compiler.runtime.step import Sequence


def _limit(name: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionsError(f"{name} must be a positive integer, got {value!r}")
    return value


class StepScheduler:
    """Iteration-level continuous batching over one engine (see the module docstring). Not thread-safe: one
    caller adds, aborts and steps."""

    def __init__(
        self,
        engine: Engine,
        *,
        eos_token_ids: tuple[int, ...],
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        speculator: Speculator | None = None,
    ):
        """``speculator`` (runtime/speculative.py) turns decode steps into verify steps of its proposals."""
        if speculator is not None and engine.group.size > 1:
            raise OptionsError("speculative decoding does not run tensor-parallel artifacts yet")
        buckets = engine.graphs.buckets
        decode = [b.num_seqs for b in buckets if b.phase == DECODE] or [b.num_seqs for b in buckets] or [1]
        prefill = [b.num_tokens for b in buckets if b.phase == PREFILL] or [
            engine.max_blocks_per_seq * engine.block_size
        ]
        self.engine = engine
        self.pool = engine.pool
        self.block_size = engine.block_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_num_seqs = _limit("max_num_seqs", max_num_seqs, max(decode))
        self.max_num_batched_tokens = _limit("max_num_batched_tokens", max_num_batched_tokens, max(prefill))
        self.prefix_cache = engine.prefix_cache if enable_prefix_caching else None
        self.speculator = speculator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is the newest, preempted first
        self._live: dict[str, Sequence] = {}
        self._aborted: list[RequestOutput] = []
        self._counters = dict.fromkeys(
            (
                "finished",
                "aborted",
                "prompt_tokens",
                "generation_tokens",
                "computed_tokens",
                "preemptions",
                "prefix_cache_queries",
                "prefix_cache_hits",
                "decode_steps",
                "prefill_steps",
                "mixed_steps",
                "verify_steps",
                "proposed_tokens",
                "accepted_tokens",
                "verified_sequences",
            ),
            0,
        )

    # -- requests -------------------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue ``request`` (its prompt already checked: ``CompiledModel.check_prompt``)."""
        if request.request_id in self._live:
            raise RequestError(f"request id {request.request_id!r} is already in use")
        params = request.params
        prompt = list(request.prompt)
        needed = self.engine.blocks_for(len(prompt) + params.max_new_tokens)
        if needed > self.pool.capacity:
            raise KVCacheExhaustedError(
                f"a request of {len(prompt)} prompt + {params.max_new_tokens} new tokens needs {needed} KV blocks; "
                f"the pool has {self.pool.capacity} (load with more kv_blocks)"
            )
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        seq = Sequence(
            tokens=prompt,
            prompt_len=len(prompt),
            max_new_tokens=params.max_new_tokens,
            request_id=request.request_id,
            params=params,
            generator=torch.Generator().manual_seed(params.seed) if params.seed is not None else None,
            stop_token_ids=frozenset(stop),
        )
        self._live[request.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        """Cancel a request: its blocks are freed now and the next step reports it finished with ABORT.
        An unknown or finished id is ignored."""
        seq = self._live.pop(request_id, None)
        if seq is None:
            return
        if seq in self.running:
            self.running.remove(seq)
            self._free(seq)
        else:
            self.waiting.remove(seq)
        if self.speculator is not None:
            self.speculator.release(seq)
        seq.finished = True
        self._counters["aborted"] += 1
        self._aborted.append(RequestOutput(request_id, [], True, ABORT))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._aborted)

    def run(self, requests: Iterable[Request]) -> dict[str, list[RequestOutput]]:
        """Add ``requests`` and step until all are done: each request's outputs, in order. Whatever is still
        running when a step fails is aborted, so the pool gets its blocks back."""
        ids = []
        outputs: dict[str, list[RequestOutput]] = {}
        try:
            for request in requests:
                self.add(request)
                ids.append(request.request_id)
                outputs[request.request_id] = []
            while self.has_work():
                for output in self.step():
                    outputs[output.request_id].append(output)
        finally:
            for request_id in ids:
                self.abort(request_id)
            mine = set(ids)
            self._aborted = [out for out in self._aborted if out.request_id not in mine]
        return outputs

    # -- one step -------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one engine step; one output per request that advanced, finished or was aborted since the last."""
        outputs, self._aborted = self._aborted, []
        work = self._schedule()
        if not work:
            if self.waiting and not self.running:
                raise KVCacheExhaustedError("no request can be admitted: the KV pool is exhausted")
            return outputs
        decode = all(n == 1 and seq.num_computed > 0 for seq, n in work)
        verified = self._verify([seq for seq, _ in work]) if decode and self.speculator is not None else None
        if verified is not None:
            outputs += verified
        else:
            self._count_step(decode, work)
            logits = self.engine.step(DECODE if decode else PREFILL, work)
            self._counters["computed_tokens"] += sum(n for _, n in work)
            self._key_new_blocks(seq for seq, _ in work)
            ready = [(row, seq) for row, (seq, _) in enumerate(work) if seq.num_computed == len(seq.tokens)]
            outputs += [RequestOutput(seq.request_id, []) for seq, _ in work if seq.num_computed < len(seq.tokens)]
            outputs += self._emit(logits, ready)
        empty = sum(len(seq.blocks) * self.block_size - seq.num_computed for seq in self.running)
        self.pool.record_occupancy(empty, self.block_size)
        return outputs

    def _verify(self, seqs: list[Sequence]) -> list[RequestOutput] | None:
        """Run a decode step as a verify step of the speculator's proposals (runtime/speculative.py); None,
        and nothing run, when it proposed nothing (the step is then a plain decode).

        A sequence may propose as many tokens as its generation has room for after the one the step always
        makes. Blocks for its proposals are taken without preempting anyone: a sequence the pool is short
        for just proposes nothing this step. What the step computed for rejected proposals stays behind
        ``num_computed``, where the next steps overwrite it, and the prefix cache only keys blocks below it.
        """
        assert self.speculator is not None
        room = [max(0, min(self.speculator.num_tokens, s.max_new_tokens - len(s.generated) - 1)) for s in seqs]
        proposals = self.speculator.propose(seqs, room)
        for seq, proposal in zip(seqs, proposals, strict=True):
            if proposal.tokens and not self.engine.hold_blocks(seq, len(seq.tokens) + len(proposal.tokens)):
                proposal.tokens, proposal.probs = [], None
        if not any(p.tokens for p in proposals):
            return None
        rows = [row for seq, p in zip(seqs, proposals, strict=True) for row in verify_rows(seq, p)]
        logits = self.engine.step(VERIFY, rows)
        self._counters["verify_steps"] += 1
        self._counters["computed_tokens"] += len(rows)
        outputs, offset = [], 0
        for seq, proposal in zip(seqs, proposals, strict=True):
            count = len(proposal.tokens) + 1
            kept = accept(seq, proposal, logits[offset : offset + count])
            offset += count
            if proposal.tokens:
                self.speculator.settle(seq, len(proposal.tokens), len(kept) - 1)
                self._counters["proposed_tokens"] += len(proposal.tokens)
                self._counters["accepted_tokens"] += len(kept) - 1
                self._counters["verified_sequences"] += 1
            seq.num_computed += len(kept)  # the last token and the proposals kept: their K/V are now right
            self._key_new_blocks([seq], tokens=seq.tokens + kept)  # the kept ones are not appended yet
            outputs.append(self._advance(seq, kept, None))
        return outputs

    def _key_new_blocks(self, seqs: Iterable[Sequence], tokens: list[int] | None = None) -> None:
        """Key the blocks each sequence has filled; ``tokens``: the one sequence's tokens, if not yet its own."""
        if self.prefix_cache is None:
            return
        for seq in seqs:
            if seq.num_computed // self.block_size > len(seq.block_hashes):
                self._key_full_blocks(seq, seq.tokens if tokens is None else tokens)

    def _count_step(self, decode: bool, work: list[tuple[Sequence, int]]) -> None:
        if decode:
            self._counters["decode_steps"] += 1
        elif any(seq.num_computed >= seq.prompt_len for seq, _ in work):
            self._counters["mixed_steps"] += 1  # decode tokens ride along with prefill chunks
        else:
            self._counters["prefill_steps"] += 1

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """This step's (sequence, tokens to compute), every block they need allocated."""
        work: list[tuple[Sequence, int]] = []
        budget = self.max_num_batched_tokens
        preemptions = self._counters["preemptions"]
        for decoding in (True, False):
            # Preemption only ever takes the newest running sequences, the end of the list: index i is still
            # the sequence it was, or past the end.
            i = 0
            while i < len(self.running) and budget > 0:
                seq = self.running[i]
                i += 1
                remaining = len(seq.tokens) - seq.num_computed
                if (remaining == 1) != decoding:
                    continue
                count = min(remaining, budget)
                if not self._grow(seq, count, work):
                    return work  # the pool is short even for this one: admit nothing new either
                work.append((seq, count))
                budget -= count
                if self._counters["preemptions"] != preemptions:
                    budget = self.max_num_batched_tokens - sum(n for _, n in work)  # a victim may have been in work
        if self._counters["preemptions"] != preemptions:
            return work  # what was just preempted would not fit back in either
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            count = self._admit(seq, budget)
            if count == 0:
                break
            self.running.append(self.waiting.popleft())
            work.append((seq, count))
            budget -= count
        return work

    def _grow(self, seq: Sequence, count: int, work: list[tuple[Sequence, int]]) -> bool:
        """Give ``seq`` the blocks for ``count`` more tokens, preempting the newest running sequences while the
        pool is short; False when ``seq`` itself had to go."""
        while not self.engine.hold_blocks(seq, seq.num_computed + count):
            victim = self.running.pop()
            work[:] = [(s, n) for s, n in work if s is not victim]
            self._free(victim)
            victim.num_computed = 0
            self.waiting.appendleft(victim)
            self._counters["preemptions"] += 1
            if victim is seq:
                return False
        return True

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Start (or restart) a waiting sequence: the cached blocks its tokens begin with, then blocks for its
        first chunk. The tokens that chunk computes, or 0 (and nothing held) if the pool is short."""
        if self.prefix_cache is not None:
            # Leave at least the last token to compute: its logits are what the step is for.
            blocks, hashes = self.prefix_cache.match(seq.tokens, (len(seq.tokens) - 1) // self.block_size)
            seq.blocks, seq.block_hashes = blocks, hashes
            seq.num_computed = len(blocks) * self.block_size
            self._counters["prefix_cache_queries"] += len(seq.tokens)
            self._counters["prefix_cache_hits"] += seq.num_computed
        count = min(len(seq.tokens) - seq.num_computed, budget)
        if not self.engine.hold_blocks(seq, seq.num_computed + count):
            if self.prefix_cache is not None:
                self._counters["prefix_cache_queries"] -= len(seq.tokens)
                self._counters["prefix_cache_hits"] -= seq.num_computed
            self._free(seq)
            seq.num_computed = 0
            return 0
        return count

    def _key_full_blocks(self, seq: Sequence, tokens: list[int]) -> None:
        """Hand the blocks ``seq`` has just filled with ``tokens`` to the prefix cache (one hash per block, once)."""
        cache = self.prefix_cache
        assert cache is not None
        size = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed // size):
            key = cache.block_hash(
                seq.block_hashes[-1] if seq.block_hashes else None, tokens[i * size : (i + 1) * size]
            )
            seq.block_hashes.append(key)
            cache.insert(key, seq.blocks[i])

    def _emit(self, logits: torch.Tensor, ready: list[tuple[int, Sequence]]) -> list[RequestOutput]:
        """Sample a token for every sequence whose last known token was just computed; finish those done."""
        outputs = []
        sampling = [(row, seq) for row, seq in ready if seq.max_new_tokens > 0]
        tokens: list[int] = []
        if sampling:
            rows = [row for row, _ in sampling]
            # index_select, not logits[rows]: list indexing of a one-row tensor takes milliseconds (torch 2.13).
            picked = logits if len(rows) == len(logits) else logits.index_select(0, torch.tensor(rows))
            choices = [(s.params.temperature, s.params.top_p, s.generator) for _, s in sampling]
            tokens = self.engine.group.agree(sample_rows(picked, choices))
        sampled = iter(tokens)
        for row, seq in ready:
            keep = logits[row].clone() if seq.params.return_logits else None
            outputs.append(self._advance(seq, [next(sampled)] if seq.max_new_tokens else [], keep))
        return outputs

    def _advance(self, seq: Sequence, tokens: list[int], logits: torch.Tensor | None) -> RequestOutput:
        """Append ``tokens`` to ``seq`` up to the first stop token or its length limit, finishing it there."""
        if len(seq.tokens) == seq.prompt_len:
            self._counters["prompt_tokens"] += seq.prompt_len
        for i, token in enumerate(tokens):
            seq.tokens.append(token)
            self._counters["generation_tokens"] += 1
            if token in seq.stop_token_ids:
                return self._finish(seq, tokens[: i + 1], STOP, logits)
            if len(seq.tokens) - seq.prompt_len >= seq.max_new_tokens:
                return self._finish(seq, tokens[: i + 1], LENGTH, logits)
        if seq.max_new_tokens == 0:
            return self._finish(seq, [], LENGTH, logits)
        return RequestOutput(seq.request_id, tokens, logits=logits)

    def _finish(self, seq: Sequence, tokens: list[int], reason: str, logits: torch.Tensor | None) -> RequestOutput:
        if self.speculator is not None:
            self.speculator.release(seq)
        seq.finished = True
        self.running.remove(seq)
        del self._live[seq.request_id]
        self._free(seq)
        self._counters["finished"] += 1
        return RequestOutput(seq.request_id, tokens, True, reason, logits)

    def _free(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks = []
        seq.block_hashes = []

    # -- introspection --------------------------------------------------------------------------------------

    def stats(self) -> dict[str, int | float]:
        """Request and token totals since this scheduler began, and the pool now (``cached_blocks``: blocks held
        only by the prefix cache, free to be evicted)."""
        pool = self.pool.stats()
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            **self._counters,
            "kv_blocks_used": pool.used,
            "kv_blocks_total": pool.total,
            "cached_blocks": pool.cached,
        }
