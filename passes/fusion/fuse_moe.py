"""Fuse MoE routing and the routed experts into ``xllm::fused_moe``: one op from router logits to output.

Before:  w, ids = topk(softmax(logits.float()), k);  [w = w / w.sum(-1)];  [w = w.to(x.dtype)]
         y = xllm.moe_experts(x, w, ids, gate_up, down)
After:   y = xllm.fused_moe(x, logits, gate_up, down, k, renormalise, weights_in_hidden_dtype)
Why: a device kernel routes and dispatches in one launch (torch_npu's npu_moe_gating_top_k_softmax +
grouped matmul, vLLM's fused_moe), and the [T, k] routing tensors stop being graph values the memory
plan must place. The CPU kernel computes the same ops in the same order, so fusing changes no bits.
One rule per (renormalise, cast) pair: both change the pattern's structure, not a literal; in float32
graphs the cast is a no-op the cleanup removes, and the first of two identical patterns takes the match.
Declines where the routing tensors are used elsewhere (the matcher refuses escaping values).
"""

from __future__ import annotations

import itertools

import torch

from xllm_compiler.ops import reference
from xllm_compiler.passes.pattern_pass import FusionPass, Rule

#: topk's meta kernel checks k <= the logits' width while the pattern is traced, and the matcher traces
#: the top_k parameter as the literal 1_000_003 (so that one pattern matches every k): a wider example.
_TRACE_WIDTH = 1_000_010


def _rule(renormalise: bool, cast: bool) -> Rule:
    def pattern(hidden, router_logits, gate_up, down, top_k):
        weights, ids = reference.route_topk(router_logits, top_k, renormalise)
        weights = weights.to(hidden.dtype) if cast else weights
        return torch.ops.xllm.moe_experts.default(hidden, weights, ids, gate_up, down)

    def replacement(hidden, router_logits, gate_up, down, top_k):
        return torch.ops.xllm.fused_moe.default(hidden, router_logits, gate_up, down, top_k, renormalise, cast)

    def example_inputs():
        return dict(
            hidden=torch.randn(2, 8),
            router_logits=torch.randn(2, _TRACE_WIDTH),
            gate_up=torch.randn(4, 16, 8),
            down=torch.randn(4, 8, 8),
            top_k=2,
        )

    return Rule(pattern, replacement, example_inputs)


fuse_moe = FusionPass(
    "fuse_moe",
    version=1,
    rules=[_rule(renormalise, cast) for renormalise, cast in itertools.product((True, False), repeat=2)],
)
