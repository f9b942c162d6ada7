"""Serving a tensor- or expert-parallel artifact under torchrun: rank 0 serves, the other ranks follow its steps.

Every rank runs the same graphs, whose collectives need all ranks in the same step. Rank 0's engine thread
broadcasts what each turn of its loop does (``Commands``: submissions, each all or none, then aborts) before
doing it; every other rank applies the same commands to its own scheduler and steps when it has work. The
schedulers start equal and change only by these commands and steps, and sampled tokens are rank 0's
(``TensorParallelGroup.agree``), so they stay equal. When rank 0 has nothing to do it still sends an empty
turn every ``heartbeat_s``, so that the other ranks' wait never reaches the process group's timeout.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from typing import Any

import torch

from xllm_compiler.runtime.parallel import DEFAULT_TIMEOUT_S
from xllm_compiler.runtime.requests import Request

log = logging.getLogger("xllm_compiler.serve")


@dataclass
class Commands:
    """One turn of rank 0's engine loop: submissions, then aborts (which may cancel one of them), then a step if
    there is work; ``stop``: the server is shutting down."""

    aborts: list[str]
    submissions: list[list[Request]]
    stop: bool = False


def add_all(scheduler: Any, requests: list[Request]) -> Exception | None:
    """Add every request or none; the scheduler's refusal (e.g. KVCacheExhaustedError) if it refused one."""
    added: list[str] = []
    try:
        for request in requests:
            scheduler.add(request)
            added.append(request.request_id)
    except Exception as exc:
        for request_id in added:
            scheduler.abort(request_id)
        return exc
    return None


class RankChannel:
    """Rank 0's commands to the other ranks of the default process group (``broadcast_object_list``)."""

    def __init__(self) -> None:
        timeout = float(os.environ.get("XLLM_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        self.heartbeat_s = timeout / 4

    def send(self, commands: Commands) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([commands], src=0)

    def receive(self) -> Commands:
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def follow(scheduler: Any, channel: RankChannel) -> None:
    """A rank other than 0: replay rank 0's turns until it stops. SIGTERM (which torchrun sends every rank) is
    left to rank 0, whose shutdown ends this loop with a last ``stop`` turn."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    live: set[str] = set()
    with torch.inference_mode():
        while True:
            commands = channel.receive()
            if commands.stop:
                break
            for requests in commands.submissions:
                if add_all(scheduler, requests) is None:
                    live.update(r.request_id for r in requests)
            for request_id in commands.aborts:
                scheduler.abort(request_id)
                live.discard(request_id)
            if not scheduler.has_work():
                continue
            try:
                outputs = scheduler.step()
            except Exception:  # rank 0 failed the same step: it aborts what was in flight, and so do we
                log.exception("an engine step failed; its requests are aborted")
                for request_id in live:
                    scheduler.abort(request_id)
                live.clear()
                continue
            live.difference_update(o.request_id for o in outputs if o.finished)
    for request_id in live:
        scheduler.abort(request_id)
