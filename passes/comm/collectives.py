"""Recognising collectives in a graph, and what the comm report says about them."""

from __future__ import annotations

import math

import torch
from torch import fx

from xllm_compiler.passes.bucket_sizes import bucket_substitutions, concrete

funcol = torch.ops._c10d_functional
ISSUES = {
    funcol.all_reduce.default,
    funcol.all_gather_into_tensor.default,
    funcol.reduce_scatter_tensor.default,
}
WAIT = funcol.wait_tensor.default
#: Nodes that take no compute time (views, unpacking); they do not count towards an overlap window.
FREE = {
    torch.ops.aten.view.default,
    torch.ops.aten.unsqueeze.default,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.split_with_sizes.default,
    torch.ops.aten.t.default,
}


def is_issue(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in ISSUES


def wait_of(issue: fx.Node) -> fx.Node | None:
    return next((u for u in issue.users if u.target is WAIT), None)


def is_compute(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target not in FREE and node.target is not WAIT and not is_issue(node)


def overlap_window(issue: fx.Node) -> int:
    """Compute nodes that run while the collective is in flight (between its issue and its wait)."""
    wait = wait_of(issue)
    count, node = 0, issue.next
    while wait is not None and node is not wait:
        count += is_compute(node)
        node = node.next
    return count


#: Fused ops that contain an all-reduce of their first argument (and so leave no window to overlap).
FUSED_ISSUES = {torch.ops.xllm.all_reduce_add_rms_norm.default}


def comm_report(gm: fx.GraphModule) -> dict[str, float]:
    """Collectives issued per call (fused ones included), bytes they move, and the overlap windows
    the schedule leaves."""
    issues = [n for n in gm.graph.nodes if is_issue(n)]
    fused = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in FUSED_ISSUES]
    subs = bucket_substitutions(gm)
    nbytes = 0
    for issue in [*issues, *fused]:
        value = issue.args[0].meta.get("val")
        if isinstance(value, torch.Tensor):
            nbytes += math.prod(concrete(size, subs) for size in value.shape) * value.element_size()
    windows = [overlap_window(i) for i in issues] + [0] * len(fused)
    return {
        "collectives": len(issues) + len(fused),
        "bytes": nbytes,
        "overlapped": sum(1 for w in windows if w > 0),
        "mean_overlap_window": round(sum(windows) / len(windows), 2) if windows else 0.0,
    }
