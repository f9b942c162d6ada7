"""reorder_collectives: each collective issued as soon as its input exists and awaited just before its
first use, so compute runs while it travels; the order of issues (which ranks match by) never changes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xllm_compiler.models.parallel import TRACED_GROUP
from xllm_compiler.ops.collectives import all_reduce
from xllm_compiler.passes.comm.collectives import WAIT, is_issue, overlap_window, wait_of
from xllm_compiler.passes.comm.reorder_collectives import reorder_collectives
from xllm_compiler.testing import assert_close, cleanup, code, run, trace

WEIGHTS = {name: torch.randn(8, 8) for name in ("w1", "w2", "w3")}
INPUTS = (torch.randn(4, 8), torch.randn(4, 8))


def issues(gm) -> list:
    return [n for n in gm.graph.nodes if is_issue(n)]


def position(gm, node) -> int:
    return list(gm.graph.nodes).index(node)


def issued_late(x, y):
    """The all-reduce written after independent work (issue and wait together, nothing in flight)."""
    partial = F.linear(x, WEIGHTS["w1"])
    other = F.linear(F.silu(F.linear(y, WEIGHTS["w2"])), WEIGHTS["w3"])
    return all_reduce(partial, TRACED_GROUP) + other


def awaited_early(x, y):
    """The all-reduce written right after its projection, as a row-parallel layer's code leaves it."""
    reduced = all_reduce(F.linear(x, WEIGHTS["w1"]), TRACED_GROUP)
    other = F.linear(F.silu(F.linear(y, WEIGHTS["w2"])), WEIGHTS["w3"])
    return reduced + other


@pytest.mark.parametrize("fn", [issued_late, awaited_early], ids=["issue-moves-up", "wait-moves-down"])
def test_issues_early_and_waits_late(fn):
    gm = cleanup(trace(fn, *INPUTS, weights=WEIGHTS))
    expected = run(gm, *INPUTS)
    (issue,) = issues(gm)
    assert overlap_window(issue) == 0

    result = reorder_collectives(gm)

    assert result and result.matches == 1  # one node moved
    assert issue.prev is issue.args[0], "issued right after the projection that computes its input"
    wait = wait_of(issue)
    assert wait.next is next(iter(wait.users)), "awaited right before its first use"
    assert overlap_window(issue) == 3  # linear, silu, linear run while it is in flight
    assert_close(run(gm, *INPUTS), expected, torch.float32)


def test_keeps_the_order_collectives_are_issued_in():
    def two_collectives(x, y):
        ready = y * 2.0  # the second collective's input exists before the first one's
        first = all_reduce(F.linear(x, WEIGHTS["w1"]), TRACED_GROUP)
        return first + all_reduce(ready, TRACED_GROUP)

    gm = cleanup(trace(two_collectives, *INPUTS, weights=WEIGHTS))
    expected = run(gm, *INPUTS)
    before = issues(gm)

    reorder_collectives(gm)

    assert issues(gm) == before, "ranks match collectives by issue order: it must not change"
    first, second = before
    assert second.prev is first, "issued as early as the order allows: right after the first"
    assert position(gm, second) < position(gm, wait_of(first))
    assert_close(run(gm, *INPUTS), expected, torch.float32)


def test_leaves_a_schedule_that_is_already_overlapped():
    gm = cleanup(trace(issued_late, *INPUTS, weights=WEIGHTS))
    reorder_collectives(gm)
    before = code(gm)

    result = reorder_collectives(gm)

    assert not result and result.matches == 0
    assert code(gm) == before


def test_a_graph_without_collectives_is_untouched():
    gm = cleanup(trace(lambda x, y: F.linear(x, WEIGHTS["w1"]) + y, *INPUTS, weights=WEIGHTS))
    before = code(gm)
    assert reorder_collectives(gm).matches == 0
    assert code(gm) == before
    assert all(n.target is not WAIT for n in gm.graph.nodes)
