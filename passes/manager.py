"""The pass pipeline, and the PassManager that runs it and records what every pass did.

The pipeline is one ordered list, the same on every platform (the platform only decides how the
``xllm::`` ops a fusion produces are lowered). Each pass is timed, its node counts and matches are
recorded, and the graph is linted after it, so a broken rewrite fails at the pass that made it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from torch import fx
from xllm_compiler.passes.cleanup.eliminate_dead_code import eliminate_dead_code
from xllm_compiler.passes.cleanup.remove_noop_casts import remove_noop_casts
from xllm_compiler.passes.graph_pass import GraphPass

from xllm_compiler.errors import CompileError, OptionsError


def default_pipeline() -> list[GraphPass]:
    """Every pass, in the order it runs."""
    return [
        # Cleanup: make the traced graph canonical so the patterns below see one form.
        remove_noop_casts,
        eliminate_dead_code,
    ]


def select_passes(names: Sequence[str] | None, disabled: Sequence[str] = ()) -> list[GraphPass]:
    """The pipeline restricted to ``names`` (None: all; ["none"] or []: nothing) minus ``disabled``.

    Order always follows the pipeline, whatever order names are given in.
    """
    pipeline = default_pipeline()
    known = {p.name for p in pipeline}
    requested = set(known) if names is None else {n for n in names if n != "none"}
    unknown = (requested | set(disabled)) - known
    if unknown:
        raise OptionsError(f"unknown pass {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    return [p for p in pipeline if p.name in requested and p.name not in disabled]


@dataclass(frozen=True)
class PassRecord:
    """One pass's entry in report.json."""

    name: str
    version: int
    seconds: float
    nodes_before: int
    nodes_after: int
    matches: int

    def to_json(self) -> dict:
        return asdict(self)


def count_nodes(gm: fx.GraphModule) -> int:
    return sum(1 for node in gm.graph.nodes if node.op == "call_function")


class PassManager:
    """Runs passes in order over one GraphModule; ``check`` (optional) runs after every pass."""

    def __init__(self, passes: Sequence[GraphPass], check: Callable[[GraphPass, fx.GraphModule], None] | None = None):
        self.passes = list(passes)
        self.check = check

    def run(self, gm: fx.GraphModule) -> list[PassRecord]:
        records = []
        for graph_pass in self.passes:
            before = count_nodes(gm)
            start = time.perf_counter()
            result = graph_pass(gm)
            seconds = time.perf_counter() - start
            try:
                gm.graph.lint()
            except Exception as exc:  # lint raises RuntimeError or AssertionError
                raise CompileError(f"pass {graph_pass.name} left an invalid graph: {exc}") from exc
            if self.check is not None:
                self.check(graph_pass, gm)
            records.append(
                PassRecord(
                    graph_pass.name, graph_pass.version, round(seconds, 6), before, count_nodes(gm), result.matches
                )
            )
        return records
