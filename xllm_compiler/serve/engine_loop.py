"""The engine thread: the one owner of the model and its scheduler, fed by the asyncio handlers.

The scheduler is not thread-safe, so handlers never call it. They ``submit`` requests and ``abort`` them through
a command list guarded by a condition; the engine thread applies the commands between two steps, steps while
there is work, and sleeps on the condition when there is none (no busy loop). Each step's outputs go back to the
handler's asyncio queue with ``loop.call_soon_threadsafe``. After every step the thread publishes a snapshot of
the scheduler's and graph cache's counters, which /metrics and the queue limit read without touching them.
Under torchrun each turn's commands also go to the other ranks first (serve/ranks.py), which replay them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from xllm_compiler.runtime.requests import Request, RequestOutput
from xllm_compiler.serve.metrics import ServerMetrics
from xllm_compiler.serve.ranks import Commands, RankChannel, add_all

log = logging.getLogger("xllm_compiler.serve")


class Admitted:
    """The first item of a submission's queue when the scheduler took all its requests."""


@dataclass
class Submission:
    """Requests of one HTTP call and the asyncio queue their outputs go to (``Admitted``, then
    ``RequestOutput``s, or one exception if the scheduler refused them or a step failed)."""

    requests: list[Request]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float = field(default_factory=time.perf_counter)

    def deliver(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the handler's loop is closed: nobody listens any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class _Live:
    submission: Submission
    last_token_at: float | None = None


class EngineLoop:
    """Runs ``scheduler`` (from ``model.make_scheduler``) on a thread of its own; see the module docstring."""

    def __init__(
        self, model: Any, scheduler: Any, metrics: ServerMetrics | None = None, ranks: RankChannel | None = None
    ):
        self.model, self.scheduler, self.metrics, self.ranks = model, scheduler, metrics, ranks
        self._cond = threading.Condition()
        self._submissions: list[Submission] = []
        self._aborts: list[str] = []
        self._stopping = False
        self._live: dict[str, _Live] = {}  # engine thread only
        self._pending: list[Submission] = []  # engine thread only: the submissions of this turn's Commands
        self.snapshot: dict[str, Any] = self._stats()
        self._thread = threading.Thread(target=self._run, name="xllm-engine", daemon=True)

    # -- any thread ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def ready(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, submission: Submission) -> None:
        with self._cond:
            self._submissions.append(submission)
            self._cond.notify()

    def abort(self, request_ids: list[str]) -> None:
        if not request_ids:
            return
        with self._cond:
            self._aborts += request_ids
            self._cond.notify()

    def queued(self) -> int:
        """Requests not yet running: submitted but not applied, and those the scheduler keeps waiting."""
        with self._cond:
            pending = sum(len(s.requests) for s in self._submissions)
        return pending + int(self.snapshot.get("waiting", 0))

    # -- the engine thread ---------------------------------------------------------------------------------

    def _stats(self) -> dict[str, Any]:
        graphs = {f"graph_{k}": v for k, v in self.model.stats().items() if isinstance(v, int)}
        return {**self.scheduler.stats(), **graphs}

    def _take_commands(self) -> Commands:
        """Wait for something to do (or, with other ranks to keep alive, at most a heartbeat), then take it."""
        heartbeat = self.ranks.heartbeat_s if self.ranks is not None else None
        with self._cond:
            while not (self._stopping or self._submissions or self._aborts or self.scheduler.has_work()):
                if not self._cond.wait(timeout=heartbeat):
                    break  # an empty turn, so that the other ranks' wait for it does not time out
            submissions, self._submissions = self._submissions, []
            aborts, self._aborts = self._aborts, []
            self._pending = submissions
            return Commands(aborts, [s.requests for s in submissions], stop=self._stopping)

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                commands = self._take_commands()
                if self.ranks is not None:
                    self.ranks.send(commands)
                if commands.stop:
                    break
                for submission in self._pending:  # before the aborts: one may cancel a request of this turn
                    self._admit(submission)
                for request_id in commands.aborts:
                    self.scheduler.abort(request_id)
                    self._live.pop(request_id, None)
                if self.scheduler.has_work():
                    self._step()
                self.snapshot = self._stats()
        shutting_down = RuntimeError("the server is shutting down")
        for submission in [*self._pending, *(live.submission for live in self._live.values())]:
            submission.deliver(shutting_down)
        for request_id in list(self._live):
            self.scheduler.abort(request_id)

    def _admit(self, submission: Submission) -> None:
        """All of a submission's requests, or none (the scheduler's refusal goes back to the handler)."""
        refusal = add_all(self.scheduler, submission.requests)
        if refusal is not None:
            submission.deliver(refusal)
            return
        for request in submission.requests:
            self._live[request.request_id] = _Live(submission)
        submission.deliver(Admitted())

    def _step(self) -> None:
        try:
            outputs = self.scheduler.step()
        except Exception as exc:  # fail what was in flight, not the server
            log.exception("an engine step failed; its requests are aborted")
            for request_id, failed in list(self._live.items()):
                self.scheduler.abort(request_id)
                failed.submission.deliver(exc)
            self._live.clear()
            return
        now = time.perf_counter()
        for output in outputs:
            live = self._live.get(output.request_id)
            if live is None:  # aborted by its handler since
                continue
            self._observe(live, output, now)
            live.submission.deliver(output)
            if output.finished:
                del self._live[output.request_id]

    def _observe(self, live: _Live, output: RequestOutput, now: float) -> None:
        if self.metrics is None or not output.new_tokens:
            return
        if live.last_token_at is None:
            self.metrics.time_to_first_token.observe(now - live.submission.arrival)
        else:
            self.metrics.inter_token_latency.observe(now - live.last_token_at)
        live.last_token_at = now
