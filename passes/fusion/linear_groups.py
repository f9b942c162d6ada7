"""Merging sibling linear layers: several ``aten.linear`` (or ``xllm::linear_w4``) calls on the same input
become one.

One matmul on a concatenated weight reads the input once and makes one call instead of several;
the outputs are split apart again (views, no copy). The concatenation is emitted as a weight-only
``cat`` that ``fold_constants`` turns into a stored weight, named by ``constant_name``.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import fx
from torch._guards import detect_fake_mode

import xllm_compiler.ops  # noqa: F401  (registers torch.ops.xllm)

aten, xllm = torch.ops.aten, torch.ops.xllm


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


@dataclass(frozen=True)
class LinearCall:
    """A linear layer called on stored tensors: ``aten.linear`` (stored: the weight) or ``xllm::linear_w4``
    (stored: qweight, scale, offset; each has one row per output, so sibling layers merge by concatenating
    each of them along dim 0)."""

    x: fx.Node
    stored: tuple[fx.Node, ...]
    bias: fx.Node | None
    group_size: int | None
    """linear_w4's group size; None for aten.linear."""


def linear_call(node: fx.Node) -> LinearCall | None:
    """The LinearCall of ``node``, an aten.linear or linear_w4 whose tensors are all stored; else None."""
    if node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        parts = linear_parts(node)
        return None if parts is None else LinearCall(parts[0], (parts[1],), parts[2], None)
    if node.target is not xllm.linear_w4.default:
        return None
    x, qweight, scale, offset, group_size, *rest = node.args
    bias = rest[0] if rest else node.kwargs.get("bias")
    stored = (qweight, scale, offset)
    if not all(isinstance(t, fx.Node) and t.op == "get_attr" for t in (*stored, *([bias] if bias else []))):
        return None
    return LinearCall(x, stored, bias, group_size)


def sibling_linears(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """Input node -> the linears (aten.linear or linear_w4 on stored tensors) that read it, in graph order."""
    groups: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        call = linear_call(node)
        if call is not None:
            groups[call.x].append(node)
    return groups


def merged_weight_name(weight_target: str, merged: str) -> str:
    """'model.layers.0.self_attn.q_proj.weight' -> 'model.layers.0.self_attn.<merged>.weight'."""
    parts = weight_target.split(".")
    if len(parts) >= 2:
        parts[-2] = merged
    return ".".join(parts)


def merge_linears(graph: fx.Graph, linears: list[fx.Node], merged: str) -> bool:
    """Replace ``linears`` (same input, in output order) by one linear and a split. False if the
    group cannot merge (bias on some but not all, different ops, group sizes or dtypes)."""
    calls = [linear_call(n) for n in linears]
    x = calls[0].x
    biases = [c.bias for c in calls]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return False
    if len({(linear.target, c.group_size) for linear, c in zip(linears, calls, strict=True)}) != 1:
        return False
    columns = list(zip(*(c.stored for c in calls), strict=True))  # each stored tensor of every layer
    if any(len({t.meta["val"].dtype for t in column}) != 1 for column in columns):
        return False
    fake_mode = detect_fake_mode([t.meta["val"] for t in columns[0]])
    sizes = [int(t.meta["val"].shape[0]) for t in columns[0]]
    # The merged linear goes right after the last value it reads; every user of the old linears must
    # come after that point, or the group is declined rather than reordered.
    last_input = max([x, *(t for column in columns for t in column), *(b for b in biases if b is not None)])
    users = [u for n in linears for u in n.users]
    if any(u < last_input for u in users):
        return False
    concatenated = [*columns, *([biases] if biases[0] is not None else [])]
    with graph.inserting_before(last_input.next):
        joined = [graph.call_function(aten.cat.default, (list(column), 0)) for column in concatenated]
        for node, column in zip(joined, concatenated, strict=True):
            node.meta["constant_name"] = merged_weight_name(column[0].target, merged)
        stored, bias = joined[: len(columns)], joined[len(columns)] if biases[0] is not None else None
        if calls[0].group_size is None:
            args = (x, *stored, bias) if bias is not None else (x, *stored)
        else:
            args = (x, *stored, calls[0].group_size, bias)
        out = graph.call_function(linears[0].target, args)
        split = graph.call_function(aten.split_with_sizes.default, (out, sizes, -1))
        pieces = [graph.call_function(operator.getitem, (split, i)) for i in range(len(sizes))]
    x_val = x.meta["val"]
    out_shape = (*x_val.shape[:-1], sum(sizes))
    with fake_mode:
        # Metadata only: the outputs' shapes and strides, made directly (a fake split with symbolic
        # sizes costs ten times more and these nodes need nothing else).
        for node, column in zip(joined, concatenated, strict=True):
            first = column[0].meta["val"]
            node.meta["val"] = torch.empty((sum(sizes), *first.shape[1:]), dtype=first.dtype)
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
