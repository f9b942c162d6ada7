"""Fuse RMSNorm into ``xllm::rms_norm``: one kernel instead of seven ops (pow, mean, add, rsqrt, mul,
casts, weight mul).

Before:  y = weight * (x * rsqrt(mean(x^2) + eps))        (in float32, cast back)
After:   y = xllm.rms_norm(x, weight, eps)
Matches every eps. Runs after fuse_add_rms_norm, so it takes the norms with no residual add before
them (the first layer's input norm, Qwen3's q/k norms).
"""

from __future__ import annotations

import torch

from xllm_compiler.ops import reference
from xllm_compiler.passes.pattern_pass import FusionPass


def pattern(x, weight, eps):
    return reference.rms_norm(x, weight, eps)


def replacement(x, weight, eps):
    return torch.ops.xllm.rms_norm.default(x, weight, eps)


def example_inputs():
    return dict(x=torch.randn(6, 16), weight=torch.randn(16), eps=1e-6)


fuse_rms_norm = FusionPass(
    "fuse_rms_norm", version=1, pattern=pattern, replacement=replacement, example_inputs=example_inputs
)
