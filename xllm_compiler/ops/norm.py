"""``xllm::rms_norm`` and ``xllm::fused_add_rms_norm``: RMSNorm, alone or after the residual add.

The fused form reads the residual stream once and returns both the normalised value and the sum
(the next layer's residual). CPU kernels are the reference arithmetic, so fusing changes no bits on
CPU; the NPU platform maps them to npu_rms_norm / npu_add_rms_norm.
"""

from __future__ import annotations

import torch

from xllm_compiler.ops.reference import rms_norm as reference_rms_norm


@torch.library.custom_op("xllm::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim, computed in float32."""
    return reference_rms_norm(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("xllm::fused_add_rms_norm", mutates_args=())
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual)."""
    summed = x + residual
    return reference_rms_norm(summed, weight, eps), summed


@fused_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)
