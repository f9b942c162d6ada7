"""Issue each collective as early as its input allows and wait as late as its first use allows.

The order in which collectives are issued is kept exactly (ranks run the same graph, and gloo,
NCCL and HCCL match collectives by issue order: reordering two of them is how ranks deadlock); the
pass checks it and fails the compile otherwise. Results do not change: only when the wait happens.
"""

from __future__ import annotations

from torch import fx

from xllm_compiler.errors import CompileError
from xllm_compiler.passes.comm.collectives import is_issue, wait_of
from xllm_compiler.passes.graph_pass import PassResult, graph_pass


@graph_pass("reorder_collectives", version=1)
def reorder_collectives(gm: fx.GraphModule) -> PassResult:
    graph = gm.graph
    before = [n for n in graph.nodes if is_issue(n)]
    moved = 0
    previous_issue: fx.Node | None = None
    for issue in before:
        earliest = max([*issue.all_input_nodes, *([previous_issue] if previous_issue else [])])
        if earliest.next is not issue:
            earliest.append(issue)
            moved += 1
        previous_issue = issue
        wait = wait_of(issue)
        if wait is None or not wait.users:
            continue
        first_use = min(wait.users)
        if first_use.prev is not wait:
            first_use.prepend(wait)
            moved += 1
    after = [n for n in graph.nodes if is_issue(n)]
    if after != before:
        raise CompileError("reorder_collectives changed the order in which collectives are issued")
    return PassResult(changed=bool(moved), matches=moved)
