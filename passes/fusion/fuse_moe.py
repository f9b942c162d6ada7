"""Fuse MoE routing and the routed experts into ``xllm::fused_moe``: one op from router logits to output.

Before:  w, ids = topk(softmax(logits.float()), k);  [w = w / w.sum(-1)];  [w = w.to(x.dtype)]
         y = xllm.moe_experts(x, w, ids, gate_up, down, table, replicas, counts, slot_mapping)
After:   y = xllm.fused_moe(x, logits, gate_up, down, k, renormalise, weights_in_hidden_dtype,
                            table, replicas, counts, slot_mapping)
Why: a device kernel routes and dispatches in one launch (torch_npu's npu_moe_gating_top_k_softmax +
grouped matmul, vLLM's fused_moe), and the [T, k] routing tensors stop being graph values the memory
plan must place. The CPU kernel computes the same ops in the same order, so fusing changes no bits.
One rule per (renormalise, cast) pair: both change the pattern's structure, not a literal; in float32
graphs the cast is a no-op the cleanup removes, and the first of two identical patterns takes the match.
Declines where the routing tensors are used elsewhere (the matcher refuses escaping values).
Expert-parallel graphs pass an ``expert_table`` (which experts this rank holds, ops/moe.py) to both ops,
others None: one more rule for each of the four, with the table and without. The routing counts
(``counts``, the expert-stats buffer the op adds into, and the ``slot_mapping`` that tells padding
apart) move into the fused op with the routing. The matcher refuses to match over a value some op
writes, and the op being fused writes ``counts``: the pass takes the two arguments off while it
matches and hands them to the op that replaces it (or back, where nothing fused).
"""

from __future__ import annotations

import itertools

import torch
from torch import fx

from xllm_compiler.ops import reference
from xllm_compiler.passes.graph_pass import PassResult
from xllm_compiler.passes.pattern_pass import FusionPass, Rule

#: topk's meta kernel checks k <= the logits' width while the pattern is traced, and the matcher traces
#: the top_k parameter as the literal 1_000_003 (so that one pattern matches every k): a wider example.
_TRACE_WIDTH = 1_000_010


def _rule(renormalise: bool, cast: bool, table: bool) -> Rule:
    def pattern(hidden, router_logits, gate_up, down, top_k, **placement):
        weights, ids = reference.route_topk(router_logits, top_k, renormalise)
        weights = weights.to(hidden.dtype) if cast else weights
        where = (placement["expert_table"], placement["replicas"]) if table else ()
        return torch.ops.xllm.moe_experts.default(hidden, weights, ids, gate_up, down, *where)

    def replacement(hidden, router_logits, gate_up, down, top_k, **placement):
        where = (placement["expert_table"], placement["replicas"]) if table else ()
        return torch.ops.xllm.fused_moe.default(hidden, router_logits, gate_up, down, top_k, renormalise, cast, *where)

    def example_inputs():
        tensors = dict(
            hidden=torch.randn(2, 8),
            router_logits=torch.randn(2, _TRACE_WIDTH),
            gate_up=torch.randn(4, 16, 8),
            down=torch.randn(4, 8, 8),
            top_k=2,
        )
        if not table:
            return tensors
        return {**tensors, "expert_table": torch.zeros(2 * _TRACE_WIDTH, dtype=torch.int64), "replicas": 2}

    return Rule(pattern, replacement, example_inputs)


_MOE_OPS = {torch.ops.xllm.moe_experts.default: 3, torch.ops.xllm.fused_moe.default: 2}  # op -> gate_up's position
_STATS = ("expert_counts", "slot_mapping")


class FuseMoE(FusionPass):
    """The rules, matched with each MoE op's stats arguments set aside (see the module docstring)."""

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        stats: dict[fx.Node, dict[str, object]] = {}  # a layer's stacked gate_up weight -> its stats arguments
        for node in gm.graph.find_nodes(op="call_function", target=torch.ops.xllm.moe_experts.default):
            names = [a.name for a in node.target._schema.arguments]
            arguments = {**dict(zip(names, node.args, strict=False)), **node.kwargs}
            stats[node.args[3]] = {name: arguments.get(name) for name in _STATS}
            kept = len(names) - len(_STATS)  # the stats arguments come last
            node.args = node.args[:kept]
            node.kwargs = {k: v for k, v in node.kwargs.items() if k not in _STATS}
        result = super().__call__(gm)
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in _MOE_OPS:
                taken = stats.get(node.args[_MOE_OPS[node.target]])
                if taken is not None:
                    node.kwargs = {**node.kwargs, **{k: v for k, v in taken.items() if v is not None}}
        return result


fuse_moe = FuseMoE(
    "fuse_moe",
    version=2,
    rules=[_rule(*flags) for flags in itertools.product((True, False), repeat=3)],
)
