"""Compute each pure expression once: identical calls on identical inputs become one node.

Impure calls (anything that writes, such as the KV-cache update inside paged attention) are never
merged, nor are values that some op writes in place, nor reads of such values: two of them may
differ even when their expressions are the same.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from xllm_compiler.passes.graph_pass import PassResult, graph_pass
from xllm_compiler.passes.matcher import mutated_nodes


def _key(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return ("node", id(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in value.items())))
    return ("literal", type(value).__name__, repr(value))


@graph_pass("eliminate_common_subexpressions", version=1)
def eliminate_common_subexpressions(gm: fx.GraphModule) -> PassResult:
    mutated = mutated_nodes(gm.graph)
    seen: dict[Any, fx.Node] = {}
    merged = 0
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "get_attr") or node.is_impure():
            continue
        if node in mutated or any(a in mutated for a in node.all_input_nodes):
            continue  # a value written in place is not interchangeable with its twin
        key = (node.op, node.target, _key(node.args), _key(node.kwargs))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            gm.graph.erase_node(node)
            merged += 1
        else:
            seen[key] = node
    return PassResult(changed=bool(merged), matches=merged)
