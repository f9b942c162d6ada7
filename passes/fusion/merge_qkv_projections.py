"""Merge the Q, K and V projections of an attention layer into one matmul (bias too, for Qwen2).

Before:  q = linear(x, Wq); k = linear(x, Wk); v = linear(x, Wv)
After:   q, k, v = split(linear(x, cat(Wq, Wk, Wv)), [q, kv, kv])    (the cat is folded to a weight)
Found by structure, not by name: three linears on one input whose results reach the query, key and
value arguments of one ``xllm::paged_attention``. Declines when only some of them have a bias. The
``xllm::linear_w4`` layers of a 4-bit checkpoint (models/int4_linear.py) merge alike, their qweight, scale
and offset each concatenated (version 2).
"""

from __future__ import annotations

import torch
from torch import fx

from xllm_compiler.passes.fusion.linear_groups import merge_linears, sibling_linears
from xllm_compiler.passes.graph_pass import PassResult, graph_pass

MAX_HOPS = 16  # views, q/k norm and rotary between a projection and attention


def _attention_slot(linear: fx.Node) -> tuple[fx.Node, int] | None:
    """(attention node, argument index 0/1/2) the linear's result flows into, through one-user chains."""
    frontier, hops = [linear], 0
    while frontier and hops < MAX_HOPS:
        nxt = []
        for node in frontier:
            for user in node.users:
                if user.target is torch.ops.xllm.paged_attention.default:
                    slots = [i for i, a in enumerate(user.args[:3]) if a is node]
                    return (user, slots[0]) if slots else None
                nxt.append(user)
        frontier, hops = nxt, hops + 1
    return None


@graph_pass("merge_qkv_projections", version=2)
def merge_qkv_projections(gm: fx.GraphModule) -> PassResult:
    merged = 0
    for linears in sibling_linears(gm.graph).values():
        if len(linears) != 3:
            continue
        slots = [_attention_slot(n) for n in linears]
        if any(s is None for s in slots) or len({s[0] for s in slots}) != 1:
            continue
        positions = [s[1] for s in slots]
        if sorted(positions) != [0, 1, 2]:
            continue
        ordered = [linears[positions.index(i)] for i in range(3)]
        merged += merge_linears(gm.graph, ordered, "qkv_proj")
    return PassResult(changed=bool(merged), matches=merged)
