"""Fuse SwiGLU's ``silu(gate) * up`` into ``xllm::silu_and_mul`` over the merged gate/up tensor.

Before:  gate, up = split(gate_up, [i, i]);  y = silu(gate) * up
After:   y = xllm.silu_and_mul(gate_up)
Two rules: the merged form merge_gate_up_projections leaves (no copy), and, when that merge is
disabled, separate gate/up tensors of the same shape (then concatenated, which costs one copy).
"""

from __future__ import annotations

import torch

from xllm_compiler.ops import reference
from xllm_compiler.passes.pattern_pass import FusionPass, Rule, same_shapes

aten = torch.ops.aten


def merged_pattern(gate_up):
    half = gate_up.shape[-1] // 2
    gate, up = aten.split_with_sizes.default(gate_up, [half, half], -1)
    return reference.silu_and_mul(gate, up)


def merged_replacement(gate_up):
    return torch.ops.xllm.silu_and_mul.default(gate_up)


def separate_pattern(gate, up):
    return reference.silu_and_mul(gate, up)


def separate_replacement(gate, up):
    return torch.ops.xllm.silu_and_mul.default(aten.cat.default([gate, up], -1))


fuse_silu_and_mul = FusionPass(
    "fuse_silu_and_mul",
    version=2,
    rules=[
        Rule(merged_pattern, merged_replacement, lambda: dict(gate_up=torch.randn(6, 32))),
        Rule(
            separate_pattern,
            separate_replacement,
            lambda: dict(gate=torch.randn(6, 16), up=torch.randn(6, 16)),
            check=same_shapes("gate", "up"),
        ),
    ],
)
