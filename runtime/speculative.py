"""Speculative decoding's proposers: who guesses the next tokens a verify step checks.

The scheduler (runtime/scheduler.py) asks a ``Speculator`` for up to ``num_tokens`` proposals per decoding
sequence, runs them as one verify step (buckets/policy.py: each proposal is a row of a decode-shaped graph),
keeps what the acceptance rule keeps (runtime/speculative_acceptance.py) and tells the speculator how it went.

- ``NgramSpeculator``: prompt lookup (runtime/ngram_proposer.py); no model runs.
- ``DraftSpeculator``: a smaller compiled artifact with the same vocabulary runs its own decode graphs over a
  KV cache of its own, ``num_tokens`` steps per verify step.

Both stop proposing for a sequence whose proposals keep failing (``AcceptanceGate``): a verify step costs
k+1 rows where a decode step costs one, and text that cannot be predicted should not pay for the attempt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from xllm_compiler.buckets.policy import DECODE, PREFILL
from xllm_compiler.errors import RequestError
from xllm_compiler.runtime.ngram_proposer import NgramProposer
from xllm_compiler.runtime.sampling import probabilities
from xllm_compiler.runtime.speculative_acceptance import accept_greedy, accept_sampled
from xllm_compiler.runtime.step import Sequence

if TYPE_CHECKING:
    from xllm_compiler.runtime.model import CompiledModel


@dataclass
class Proposal:
    """Proposed next tokens of one sequence; ``probs`` [len(tokens), vocab] are the draft's probabilities
    they were drawn from (None: a point mass, e.g. a lookup, or greedy drafting)."""

    tokens: list[int]
    probs: torch.Tensor | None = None


def verify_rows(seq: Sequence, proposal: Proposal) -> list[tuple[Sequence, int]]:
    """The decode-graph rows that check ``proposal`` (buckets/policy.py): row i computes position
    ``num_computed + i`` of the sequence extended by the proposals, over the blocks ``seq`` holds, so its
    logits are the target's distribution after proposal i (row 0: after the last real token). The rows are
    stand-ins that share ``seq``'s blocks; ``seq`` itself is not advanced."""
    extended = seq.tokens + proposal.tokens
    return [
        (Sequence(tokens=extended, prompt_len=seq.prompt_len, blocks=seq.blocks, num_computed=seq.num_computed + i), 1)
        for i in range(len(proposal.tokens) + 1)
    ]


def accept(seq: Sequence, proposal: Proposal, logits: torch.Tensor) -> list[int]:
    """The tokens a verify step writes for ``seq``: the proposals kept, then one of the target's own
    (runtime/speculative_acceptance.py), by the request's own temperature, top-p and generator."""
    params = seq.params
    if params.temperature == 0.0:
        return accept_greedy(proposal.tokens, logits)
    target = probabilities(logits, params.temperature, params.top_p)
    return accept_sampled(proposal.tokens, target, proposal.probs, seq.generator)


class Speculator(Protocol):
    num_tokens: int

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[Proposal]:
        """At most ``limits[i]`` proposed tokens after ``seqs[i].tokens``, for each sequence."""
        ...

    def settle(self, seq: Sequence, proposed: int, kept: int) -> None:
        """``kept`` of the ``proposed`` tokens of ``seq`` were accepted by its verify step."""
        ...

    def release(self, seq: Sequence) -> None:
        """``seq`` has finished or was preempted: drop what is held for it."""
        ...


@dataclass
class _GateState:
    verify_steps: int = 0
    rate: float = 0.0  # moving acceptance rate of the proposals made
    paused_for: int = 0
    pauses: int = 0


@dataclass
class AcceptanceGate:
    """Per sequence: after ``warmup`` verify steps, a moving acceptance rate under ``min_rate`` pauses its
    proposals for ``pause`` decode steps, doubling with every pause (up to ``max_pause``), then tries again:
    one verify step decides a retry (text that could not be predicted rarely can be a few tokens later, and a
    failed retry costs a whole verify step, k draft steps with a draft model)."""

    min_rate: float = 0.2
    warmup: int = 4
    pause: int = 8
    max_pause: int = 256
    decay: float = 0.7
    _states: dict[Sequence, _GateState] = field(default_factory=dict)

    def allows(self, seq: Sequence) -> bool:
        state = self._states.get(seq)
        if state is None or state.paused_for == 0:
            return True
        state.paused_for -= 1
        return False

    def settle(self, seq: Sequence, proposed: int, kept: int) -> None:
        if proposed == 0:
            return
        state = self._states.setdefault(seq, _GateState())
        state.verify_steps += 1
        # A running mean at first, then a moving one that forgets with ``decay``.
        weight = max(1 - self.decay, 1 / state.verify_steps)
        state.rate += weight * (kept / proposed - state.rate)
        if state.verify_steps >= (self.warmup if state.pauses == 0 else 1) and state.rate < self.min_rate:
            state.paused_for = min(self.pause << state.pauses, self.max_pause)
            state.pauses += 1
            state.verify_steps, state.rate = 0, 0.0

    def release(self, seq: Sequence) -> None:
        self._states.pop(seq, None)


class NgramSpeculator:
    """Prompt-lookup proposals: the tokens that followed the latest earlier occurrence of the last n tokens."""

    def __init__(self, num_tokens: int, min_n: int = 2, max_n: int = 4, gate: AcceptanceGate | None = None):
        self.num_tokens = num_tokens
        self.proposer = NgramProposer(num_tokens, min_n, max_n)
        self.gate = gate or AcceptanceGate()

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[Proposal]:
        return [
            Proposal(self.proposer.propose(seq.tokens, limit) if self.gate.allows(seq) else [])
            for seq, limit in zip(seqs, limits, strict=True)
        ]

    def settle(self, seq: Sequence, proposed: int, kept: int) -> None:
        self.gate.settle(seq, proposed, kept)

    def release(self, seq: Sequence) -> None:
        self.gate.release(seq)


class DraftSpeculator:
    """Proposals from a smaller compiled model: ``num_tokens`` of its decode steps per verify step.

    The draft keeps a sequence of its own per target sequence, in its own KV pool: before proposing, it is
    brought up to the target's tokens (what the draft computed for proposals the target rejected is rolled
    back, then a prefill step computes what it has not seen). Greedy requests draft greedily (the acceptance
    rule needs no draft probabilities); sampled ones draw from the draft's distribution at the request's
    temperature and top-p, and hand it over for the rejection rule. A sequence the draft's pool or max_seq_len
    cannot hold gets no proposals, never an error.
    """

    def __init__(self, draft: CompiledModel, num_tokens: int, vocab_size: int, gate: AcceptanceGate | None = None):
        if draft.vocab_size != vocab_size:
            raise RequestError(
                f"the draft model's vocabulary has {draft.vocab_size} tokens, the target's {vocab_size}: "
                "a draft must share the target's vocabulary"
            )
        if draft.engine.group.size != 1:
            raise RequestError("a tensor-parallel artifact cannot be a draft model")
        self.num_tokens = num_tokens
        self.engine = draft.engine
        self.max_seq_len = draft.max_seq_len
        self.gate = gate or AcceptanceGate()
        self._seqs: dict[Sequence, Sequence] = {}

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[Proposal]:
        drafting: list[tuple[int, Sequence, Sequence, int]] = []
        for i, (seq, limit) in enumerate(zip(seqs, limits, strict=True)):
            limit = min(limit, self.max_seq_len - len(seq.tokens))
            if limit > 0 and self.gate.allows(seq):
                mine = self._follow(seq)
                if self.engine.hold_blocks(mine, len(seq.tokens) + limit - 1):
                    drafting.append((i, seq, mine, limit))
        self._catch_up([mine for _, _, mine, _ in drafting])
        proposals = [Proposal([]) for _ in seqs]
        rows: dict[int, list[torch.Tensor]] = {}
        for step in range(max((limit for *_, limit in drafting), default=0)):
            active = [entry for entry in drafting if entry[3] > step]
            logits = self.engine.step(DECODE, [(mine, 1) for _, _, mine, _ in active])
            for (i, seq, mine, _), row in zip(active, logits, strict=True):
                token, probs = self._draw(seq, row)
                proposals[i].tokens.append(token)
                if probs is not None:
                    rows.setdefault(i, []).append(probs)
                mine.tokens.append(token)
        for i, probs in rows.items():
            proposals[i].probs = torch.stack(probs)
        return proposals

    def settle(self, seq: Sequence, proposed: int, kept: int) -> None:
        self.gate.settle(seq, proposed, kept)

    def release(self, seq: Sequence) -> None:
        self.gate.release(seq)
        mine = self._seqs.pop(seq, None)
        if mine is not None:
            self.engine.pool.release(mine.blocks)
            mine.blocks = []

    def _follow(self, seq: Sequence) -> Sequence:
        """The draft's sequence for ``seq``, its tokens now ``seq``'s, computed only as far as both agree."""
        mine = self._seqs.get(seq)
        if mine is None:
            mine = self._seqs[seq] = Sequence(tokens=[], prompt_len=seq.prompt_len)
        agree = 0
        for a, b in zip(mine.tokens, seq.tokens, strict=False):
            if a != b:
                break
            agree += 1
        mine.tokens = list(seq.tokens)
        mine.num_computed = min(mine.num_computed, agree, len(seq.tokens) - 1)
        return mine

    def _catch_up(self, seqs: list[Sequence]) -> None:
        """Compute every token but the last of each sequence (the first drafting step feeds the last)."""
        behind = [(mine, len(mine.tokens) - 1 - mine.num_computed) for mine in seqs]
        behind = [(mine, n) for mine, n in behind if n > 0]
        if behind:
            self.engine.step(PREFILL, behind)

    @staticmethod
    def _draw(seq: Sequence, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        params = seq.params
        if params.temperature == 0.0:
            return int(logits.argmax()), None
        probs = probabilities(logits[None], params.temperature, params.top_p)[0]
        return int(torch.multinomial(probs, 1, generator=seq.generator)), probs
