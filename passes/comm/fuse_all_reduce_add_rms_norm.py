"""Fuse all-reduce + residual add + RMSNorm into ``xllm::all_reduce_add_rms_norm``.

Before:  y, h = fused_add_rms_norm(wait(all_reduce(x)), residual, w, eps)
After:   y, h = xllm.all_reduce_add_rms_norm(x, residual, w, eps, group)
Platforms with a fused kernel for the end of a tensor-parallel sublayer take it; elsewhere the op is
its composite. It runs after the overlap passes and declines a collective that has compute in
flight with it (a window the fusion would close), so it only takes the ones nothing can hide.
"""

from __future__ import annotations

import operator

import torch

from xllm_compiler.passes.comm.collectives import overlap_window
from xllm_compiler.passes.matcher import Match
from xllm_compiler.passes.pattern_pass import FusionPass, Rule

funcol, xllm = torch.ops._c10d_functional, torch.ops.xllm


def pattern(x, residual, weight, eps):
    reduced = funcol.wait_tensor.default(funcol.all_reduce.default(x, "sum", "tp"))
    fused = xllm.fused_add_rms_norm.default(reduced, residual, weight, eps)
    return operator.getitem(fused, 0), operator.getitem(fused, 1)


def pattern_residual_first(x, residual, weight, eps):
    """The same sum written residual + reduced (as transformers' layers write it)."""
    reduced = funcol.wait_tensor.default(funcol.all_reduce.default(x, "sum", "tp"))
    fused = xllm.fused_add_rms_norm.default(residual, reduced, weight, eps)
    return operator.getitem(fused, 0), operator.getitem(fused, 1)


def replacement(x, residual, weight, eps):
    fused = xllm.all_reduce_add_rms_norm.default(x, residual, weight, eps, "tp")
    return operator.getitem(fused, 0), operator.getitem(fused, 1)


def example_inputs():
    return dict(x=torch.randn(6, 16), residual=torch.randn(6, 16), weight=torch.randn(16), eps=1e-6)


def nothing_in_flight(match: Match) -> bool:
    issues = [n for n in match.graph_nodes() if n.target is funcol.all_reduce.default]
    return all(overlap_window(issue) == 0 for issue in issues)


fuse_all_reduce_add_rms_norm = FusionPass(
    "fuse_all_reduce_add_rms_norm",
    version=1,
    rules=[
        Rule(pattern, replacement, example_inputs, check=nothing_in_flight),
        Rule(pattern_residual_first, replacement, example_inputs, check=nothing_in_flight),
    ],
)
