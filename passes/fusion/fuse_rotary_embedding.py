"""Fuse the rotate-half rotary embedding of q and k into one ``xllm::rotary_embedding``.

Before:  q' = q * cos + rotate_half(q) * sin;  k' = k * cos + rotate_half(k) * sin
After:   q', k' = xllm.rotary_embedding(q, k, cos, sin)
The two halves of rotate_half are checked against head_dim // 2 of the matched tensors, so the
pattern fits every head size. Declines when q and k use different cos/sin.
"""

from __future__ import annotations

import operator

import torch

from xllm_compiler.ops import reference
from xllm_compiler.passes.pattern_pass import FusionPass


def pattern(query, key, cos, sin):
    return reference.apply_rotary(query, cos, sin), reference.apply_rotary(key, cos, sin)


def replacement(query, key, cos, sin):
    rotated = torch.ops.xllm.rotary_embedding.default(query, key, cos, sin)
    return operator.getitem(rotated, 0), operator.getitem(rotated, 1)


def example_inputs():
    return dict(
        query=torch.randn(5, 4, 16), key=torch.randn(5, 2, 16), cos=torch.randn(5, 1, 16), sin=torch.randn(5, 1, 16)
    )


fuse_rotary_embedding = FusionPass(
    "fuse_rotary_embedding", version=1, pattern=pattern, replacement=replacement, example_inputs=example_inputs
)
