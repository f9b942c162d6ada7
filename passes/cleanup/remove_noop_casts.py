"""Remove ``aten.to`` casts to the dtype a value already has.

The reference RMSNorm casts to float32 and back; in a float32 model both casts are no-ops that
export still records. They cost a dispatch each and hide the pattern's shape from the fusions.
"""

from __future__ import annotations

import torch
from torch import fx
from xllm_compiler.passes.graph_pass import PassResult, graph_pass


def _is_noop_cast(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not torch.ops.aten.to.dtype:
        return False
    source, dtype = node.args[0], node.args[1]
    value = source.meta.get("val") if isinstance(source, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dtype == dtype and not node.kwargs.get("copy", False)


@graph_pass("remove_noop_casts", version=1)
def remove_noop_casts(gm: fx.GraphModule) -> PassResult:
    removed = 0
    for node in list(gm.graph.nodes):
        if _is_noop_cast(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    if removed:
        gm.recompile()
    return PassResult(changed=bool(removed), matches=removed)
