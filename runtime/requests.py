"""What the step-level scheduler takes and gives back: requests in, per-step token outputs out.

One scheduler serves both ``CompiledModel.generate()`` and the server (xllm_compiler/serve): callers add
requests between any two steps, and every ``step()`` reports, per request that advanced, the tokens it made
and whether it finished. Stop *strings* are text and belong to the caller that detokenizes; the scheduler
stops on token ids only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: Why a request finished, as OpenAI names it ("abort": cancelled by its caller, e.g. a client disconnect).
STOP, LENGTH, ABORT = "stop", "length", "abort"


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it ends.

    ``temperature`` 0 is greedy. ``seed`` makes a sampled request reproducible on its own, whatever else is
    batched with it (each seeded request has a generator of its own). ``stop_token_ids`` end a request in
    addition to the model's eos ids (which ``ignore_eos`` turns off); the stopping token is part of the output.
    ``return_logits`` keeps the float32 logits row of each step in the output (``CompiledModel.logits``).
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    return_logits: bool = False


@dataclass
class Request:
    """A prompt (token ids, already checked against the vocabulary and max_seq_len) and how to continue it."""

    request_id: str
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class RequestOutput:
    """What one step did for one request: the tokens it appended (usually one; none for a prefill chunk
    that did not reach the prompt's end) and, when ``finished``, why (STOP, LENGTH or ABORT)."""

    request_id: str
    new_tokens: list[int]
    finished: bool = False
    finish_reason: str | None = None
    logits: torch.Tensor | None = None
