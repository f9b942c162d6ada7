"""The compile report: what each stage did and how long it took, for report.json and the terminal.

Stages announce themselves to an optional listener (the CLI's rich progress display); the API
compiles silently with the same record.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


class StageListener(Protocol):
    def stage_started(self, name: str, description: str) -> None: ...

    def stage_finished(self, name: str, seconds: float) -> None: ...


@dataclass
class CompileReport:
    """Everything report.json says about one compile."""

    stages: list[dict[str, Any]] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)
    listener: StageListener | None = None

    @contextlib.contextmanager
    def stage(self, name: str, description: str) -> Iterator[None]:
        if self.listener:
            self.listener.stage_started(name, description)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.stages.append({"name": name, "seconds": round(seconds, 4)})
        if self.listener:
            self.listener.stage_finished(name, seconds)

    def total_seconds(self) -> float:
        return round(sum(s["seconds"] for s in self.stages), 4)

    def to_json(self) -> dict[str, Any]:
        return {**self.sections, "stages": self.stages, "total_seconds": self.total_seconds()}
