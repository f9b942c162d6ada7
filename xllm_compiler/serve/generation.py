"""One HTTP call's requests in flight, on the asyncio side: engine outputs in, text deltas per choice out.

A ``Generation`` submits its requests to the engine thread, waits until they are admitted (so a refusal can
still be an HTTP error before any byte of a stream is sent), then turns each ``RequestOutput`` into a ``Delta``
of text: detokenized incrementally and cut at the first stop string, whose request is then aborted. Whatever is
unfinished when the consumer goes away (a client disconnect, a cancelled handler) is aborted, so its KV blocks
come back at the engine's next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from xllm_compiler.runtime.requests import ABORT, STOP, Request, RequestOutput
from xllm_compiler.serve.detokenize import Detokenizer, StopStrings
from xllm_compiler.serve.engine_loop import Admitted, EngineLoop, Submission
from xllm_compiler.serve.metrics import ServerMetrics


@dataclass(frozen=True)
class Delta:
    """What one engine output added to a choice: its text (possibly empty), tokens, and why it ended."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class Choice:
    """One choice (one scheduler request) of a call: its tokens, text so far and why it ended."""

    index: int
    request: Request
    detokenizer: Detokenizer | None
    stops: StopStrings
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


class Generation:
    """The choices of one completion or chat call (one request each); see the module docstring."""

    def __init__(
        self,
        call_id: str,
        engine: EngineLoop,
        requests: list[Request],
        tokenizer: Any | None,
        stop: list[str],
        metrics: ServerMetrics | None = None,
    ):
        self.call_id, self.engine, self.metrics = call_id, engine, metrics
        self.choices = [
            Choice(i, r, Detokenizer(tokenizer) if tokenizer is not None else None, StopStrings(stop))
            for i, r in enumerate(requests)
        ]
        self._by_id = {c.request.request_id: c for c in self.choices}
        self._queue: asyncio.Queue = asyncio.Queue()

    async def start(self) -> None:
        """Hand the requests to the engine; re-raises the scheduler's refusal (e.g. KVCacheExhaustedError)."""
        loop = asyncio.get_running_loop()
        self.engine.submit(Submission([c.request for c in self.choices], loop, self._queue))
        try:
            first = await self._queue.get()
        except asyncio.CancelledError:
            self._abort_unfinished()  # admitted or not, the engine drops them
            raise
        if isinstance(first, BaseException):
            raise first
        assert isinstance(first, Admitted)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(c.request.prompt) for c in self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    async def deltas(self) -> AsyncIterator[Delta]:
        """Every choice's deltas as the engine makes them, until all have finished."""
        try:
            while any(c.finish_reason is None for c in self.choices):
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                delta = self._apply(item)
                if delta is not None:
                    yield delta
        finally:
            self._abort_unfinished()

    async def collect(self) -> None:
        """Run to the end, keeping each choice's whole text (for a non-streaming response)."""
        async for delta in self.deltas():
            self.choices[delta.index].text += delta.text

    def _apply(self, output: RequestOutput) -> Delta | None:
        choice = self._by_id[output.request_id]
        if choice.finish_reason is not None:  # already cut at a stop string
            return None
        choice.tokens += output.new_tokens
        text = ""
        if choice.detokenizer is not None:
            text = choice.detokenizer.add(output.new_tokens) + (choice.detokenizer.flush() if output.finished else "")
        text = choice.stops.feed(text)
        if choice.stops.stopped:
            choice.finish_reason = STOP
            if not output.finished:
                self.engine.abort([output.request_id])
        elif output.finished:
            text += choice.stops.flush()
            choice.finish_reason = output.finish_reason
        if choice.finish_reason is not None and self.metrics is not None:
            self.metrics.finished.labels(finish_reason=choice.finish_reason).inc()
        if not (text or output.new_tokens or choice.finish_reason):
            return None
        return Delta(choice.index, text, list(output.new_tokens), choice.finish_reason)

    def _abort_unfinished(self) -> None:
        unfinished = [c for c in self.choices if c.finish_reason is None]
        for choice in unfinished:
            choice.finish_reason = ABORT
            if self.metrics is not None:
                self.metrics.finished.labels(finish_reason=ABORT).inc()
        self.engine.abort([c.request.request_id for c in unfinished])
