"""Normalise only the rows that reach the LM head: select the logits rows before the final norm.

Before:  y = fused_add_rms_norm(x, residual, weight, eps)[0];  rows = index_select(y, 0, logits_indices)
After:   rows = fused_add_rms_norm(index_select(x, ...), index_select(residual, ...), weight, eps)[0]
A prefill step of T tokens from S prompts then normalises S rows instead of T (8 instead of 512). The
norm is row-wise, so results are identical. Declines when the sum output is used (the pattern's
intermediate would escape).
"""

from __future__ import annotations

import torch

from xllm_compiler.passes.pattern_pass import FusionPass

aten, xllm = torch.ops.aten, torch.ops.xllm


def pattern(x, residual, weight, eps, rows):
    normed = xllm.fused_add_rms_norm.default(x, residual, weight, eps)[0]
    return aten.index_select.default(normed, 0, rows)


def replacement(x, residual, weight, eps, rows):
    x, residual = aten.index_select.default(x, 0, rows), aten.index_select.default(residual, 0, rows)
    return xllm.fused_add_rms_norm.default(x, residual, weight, eps)[0]


def example_inputs():
    return dict(
        x=torch.randn(6, 16), residual=torch.randn(6, 16), weight=torch.randn(16), eps=1e-6, rows=torch.tensor([2, 5])
    )


select_rows_before_final_norm = FusionPass(
    "select_rows_before_final_norm", version=1, pattern=pattern, replacement=replacement, example_inputs=example_inputs
)
