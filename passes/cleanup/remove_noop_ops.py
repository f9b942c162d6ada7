"""Remove ops that return their input unchanged: casts to the same dtype, views/reshapes/expands to
the same shape, full-range slices, aliases.

The reference RMSNorm casts to float32 and back; in a float32 model both casts are no-ops that
export still records. Each costs a dispatch and hides the pattern's shape from the fusions.
"""

from __future__ import annotations

import sys

import torch
from torch import fx

from xllm_compiler.passes.graph_pass import PassResult, graph_pass
from xllm_compiler.passes.matcher import normalized_args, same_int

aten = torch.ops.aten
SAME_SHAPE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}


def _value(node: object):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return len(a.shape) == len(b.shape) and all(same_int(x, y) for x, y in zip(a.shape, b.shape, strict=True))


def is_noop(node: fx.Node) -> bool:
    if node.op != "call_function" or not node.args:
        return False
    source, out = _value(node.args[0]), node.meta.get("val")
    if not isinstance(source, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    args, _ = normalized_args(node)
    if node.target is aten.to.dtype:
        # to.dtype(self, dtype, non_blocking, copy, memory_format)
        return source.dtype == args[1] and not args[3] and args[4] in (None, torch.preserve_format)
    if node.target is aten.alias.default:
        return True
    if node.target in SAME_SHAPE_OPS:
        return _same_shape(source, out) and source.dtype == out.dtype
    if node.target is aten.slice.Tensor:
        _, dim, start, end, step = args
        return start == 0 and step == 1 and (end == sys.maxsize or same_int(end, source.shape[dim]))
    return False


@graph_pass("remove_noop_ops", version=1)
def remove_noop_ops(gm: fx.GraphModule) -> PassResult:
    removed = 0
    for node in list(gm.graph.nodes):
        if is_noop(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    return PassResult(changed=bool(removed), matches=removed)
