"""Fuse residual add + RMSNorm into ``xllm::fused_add_rms_norm``: one pass over the residual stream.

Before:  h = x + residual;  y = rms_norm(h, weight, eps)      (h is used again by the next layer)
After:   y, h = xllm.fused_add_rms_norm(x, residual, weight, eps)
Both outputs are pattern outputs, so h may have other users; the add's operands match in either order.
Declines a broadcasting add (x and residual of different shapes): the fused op adds equal shapes.
"""

from __future__ import annotations

import operator

import torch

from xllm_compiler.ops import reference
from xllm_compiler.passes.pattern_pass import FusionPass, same_shapes


def pattern(x, residual, weight, eps):
    summed = x + residual
    return reference.rms_norm(summed, weight, eps), summed


def replacement(x, residual, weight, eps):
    fused = torch.ops.xllm.fused_add_rms_norm.default(x, residual, weight, eps)
    return operator.getitem(fused, 0), operator.getitem(fused, 1)


def example_inputs():
    return dict(x=torch.randn(6, 16), residual=torch.randn(6, 16), weight=torch.randn(16), eps=1e-6)


fuse_add_rms_norm = FusionPass(
    "fuse_add_rms_norm",
    version=2,
    pattern=pattern,
    replacement=replacement,
    example_inputs=example_inputs,
    check=same_shapes("x", "residual"),
)
