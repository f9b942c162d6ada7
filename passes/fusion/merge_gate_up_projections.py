"""Merge the gate and up projections of a SwiGLU MLP into one matmul.

Before:  g = linear(x, Wg); u = linear(x, Wu); y = silu(g) * u
After:   g, u = split(linear(x, cat(Wg, Wu)), [i, i]); y = silu(g) * u     (then fuse_silu_and_mul)
Found by structure: two linears on one input where one feeds only ``silu`` and that result is
multiplied by the other. Two ``xllm::linear_w4`` layers of a 4-bit checkpoint merge alike (version 2).
"""

from __future__ import annotations

import torch
from torch import fx

from xllm_compiler.passes.fusion.linear_groups import merge_linears, sibling_linears
from xllm_compiler.passes.graph_pass import PassResult, graph_pass

aten = torch.ops.aten


def _gate_and_up(linears: list[fx.Node]) -> list[fx.Node] | None:
    for gate in linears:
        users = list(gate.users)
        if len(users) != 1 or users[0].target is not aten.silu.default:
            continue
        for product in users[0].users:
            if product.target is aten.mul.Tensor:
                others = [a for a in product.args if a is not users[0]]
                if len(others) == 1 and others[0] in linears and others[0] is not gate:
                    return [gate, others[0]]
    return None


@graph_pass("merge_gate_up_projections", version=2)
def merge_gate_up_projections(gm: fx.GraphModule) -> PassResult:
    merged = 0
    for linears in sibling_linears(gm.graph).values():
        if len(linears) != 2:
            continue
        pair = _gate_and_up(linears)
        if pair is not None:
            merged += merge_linears(gm.graph, pair, "gate_up_proj")
    return PassResult(changed=bool(merged), matches=merged)
