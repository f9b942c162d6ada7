"""Merging sibling linear layers: several ``aten.linear`` calls on the same input become one.

One matmul on a concatenated weight reads the input once and makes one call instead of several;
the outputs are split apart again (views, no copy). The concatenation is emitted as a weight-only
``cat`` that ``fold_constants`` turns into a stored weight, named by ``constant_name``.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch import fx
from torch._guards import detect_fake_mode

aten = torch.ops.aten


def linear_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """(input, weight, bias) of a linear whose weight and bias are stored weights, else None."""
    if node.op != "call_function" or node.target is not aten.linear.default:
        return None
    x, weight = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    if bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr"):
        return None
    return x, weight, bias


def sibling_linears(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """Input node -> the linears (on stored weights) that read it, in graph order."""
    groups: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        parts = linear_parts(node)
        if parts is not None:
            groups[parts[0]].append(node)
    return groups


def merged_weight_name(weight_target: str, merged: str) -> str:
    """'model.layers.0.self_attn.q_proj.weight' -> 'model.layers.0.self_attn.<merged>.weight'."""
    parts = weight_target.split(".")
    if len(parts) >= 2:
        parts[-2] = merged
    return ".".join(parts)


def merge_linears(graph: fx.Graph, linears: list[fx.Node], merged: str) -> bool:
    """Replace ``linears`` (same input, in output order) by one linear and a split. False if the
    group cannot merge (bias on some but not all, dtypes differ)."""
    parts = [linear_parts(n) for n in linears]
    x = parts[0][0]
    weights = [p[1] for p in parts]
    biases = [p[2] for p in parts]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return False
    if len({w.meta["val"].dtype for w in weights}) != 1:
        return False
    fake_mode = detect_fake_mode([w.meta["val"] for w in weights])
    sizes = [int(w.meta["val"].shape[0]) for w in weights]
    # The merged linear goes right after the last value it reads; every user of the old linears must
    # come after that point, or the group is declined rather than reordered.
    last_input = max([x, *weights, *(b for b in biases if b is not None)])
    users = [u for n in linears for u in n.users]
    if any(u < last_input for u in users):
        return False
    with graph.inserting_before(last_input.next):
        weight = graph.call_function(aten.cat.default, (weights, 0))
        weight.meta["constant_name"] = merged_weight_name(weights[0].target, merged)
        bias = None
        if biases[0] is not None:
            bias = graph.call_function(aten.cat.default, (biases, 0))
            bias.meta["constant_name"] = merged_weight_name(biases[0].target, merged)
        out = graph.call_function(aten.linear.default, (x, weight, bias) if bias is not None else (x, weight))
        split = graph.call_function(aten.split_with_sizes.default, (out, sizes, -1))
        pieces = [graph.call_function(operator.getitem, (split, i)) for i in range(len(sizes))]
    x_val = x.meta["val"]
    out_shape = (*x_val.shape[:-1], sum(sizes))
    with fake_mode:
        # Metadata only: the outputs' shapes and strides, made directly (a fake split with symbolic
        # sizes costs ten times more and these nodes need nothing else).
        weight.meta["val"] = torch.empty((sum(sizes), *weights[0].meta["val"].shape[1:]), dtype=x_val.dtype)
        if bias is not None:
            bias.meta["val"] = torch.empty((sum(sizes),), dtype=x_val.dtype)
        out.meta["val"] = torch.empty(out_shape, dtype=x_val.dtype)
        strides = out.meta["val"].stride()
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        split.meta["val"] = [
            torch.empty_strided((*out_shape[:-1], size), strides, dtype=x_val.dtype).as_strided(
                (*out_shape[:-1], size), strides, offset
            )
            for size, offset in zip(sizes, offsets, strict=True)
        ]
    for i, (piece, old) in enumerate(zip(pieces, linears, strict=True)):
        piece.meta["val"] = split.meta["val"][i]
        old.replace_all_uses_with(piece)
        graph.erase_node(old)
    return True
