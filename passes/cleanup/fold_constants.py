"""Evaluate weight-only subgraphs at compile time and store their results as weights.

A node whose inputs are all weights (get_attr) computes the same value on every call: a merged
QKV weight (``cat`` of three), a transposed weight. It is evaluated once here and replaced by a new
weight, which the artifact stores instead of its sources. Folding never grows the artifact: a result
larger than the weights it reads (an ``expand``, say) is left to run.

A producer may name the result it wants folded with ``node.meta["constant_name"]``.
"""

from __future__ import annotations

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.fx.node import map_arg

from xllm_compiler.passes.cleanup.eliminate_dead_code import delete_unused_attributes
from xllm_compiler.passes.graph_pass import PassResult, graph_pass


def _attribute(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, leaf = target.rpartition(".")
    return getattr(gm.get_submodule(owner), leaf)


def _register(gm: fx.GraphModule, name: str, tensor: torch.Tensor) -> str:
    """Store ``tensor`` under a free dotted attribute name based on ``name``."""
    candidate, suffix = name, 1
    while True:
        owner, _, leaf = candidate.rpartition(".")
        try:
            holder = gm.get_submodule(owner) if owner else gm
        except AttributeError:
            holder = None
        if holder is None or not hasattr(holder, leaf):
            break
        candidate, suffix = f"{name}_{suffix}", suffix + 1
    owner, _, leaf = candidate.rpartition(".")
    module: torch.nn.Module = gm
    for part in owner.split(".") if owner else []:
        if not hasattr(module, part):
            module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
    module.register_buffer(leaf, tensor)
    return candidate


@graph_pass("fold_constants", version=1)
def fold_constants(gm: fx.GraphModule) -> PassResult:
    graph = gm.graph
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if "val" in n.meta])
    values: dict[fx.Node, torch.Tensor] = {}
    folded = 0
    for node in list(graph.nodes):
        if node.op == "get_attr":
            values[node] = _attribute(gm, node.target)
            continue
        if node.op != "call_function" or node.is_impure() or not node.all_input_nodes:
            continue
        if not all(n in values for n in node.all_input_nodes):
            continue
        with torch.no_grad():
            result = node.target(*map_arg(node.args, values.get), **map_arg(node.kwargs, values.get))
        if not isinstance(result, torch.Tensor):
            continue
        source_bytes = sum(values[n].nbytes for n in node.all_input_nodes if n.op == "get_attr")
        if result.nbytes > source_bytes:
            continue
        name = node.meta.get("constant_name") or f"folded.{node.name}"
        target = _register(gm, name, result.contiguous())
        with graph.inserting_before(node):
            attr = graph.get_attr(target)
        attr.meta["val"] = fake_mode.from_tensor(result, static_shapes=True) if fake_mode else result
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
        values[attr] = result
        folded += 1
    if folded:
        graph.eliminate_dead_code()
        delete_unused_attributes(gm)
    return PassResult(changed=bool(folded), matches=folded)
