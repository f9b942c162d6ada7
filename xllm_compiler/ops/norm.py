"""``xllm::rms_norm`` and ``xllm::fused_add_rms_norm``: RMSNorm, alone or after the residual add.

The fused form reads the residual stream once and returns both the normalised value and the sum
(the next layer's residual). CPU kernels are the reference arithmetic, so fusing changes no bits on
CPU; the NPU platform maps them to npu_rms_norm / npu_add_rms_norm. The ``*_out`` forms write into
buffers the memory planner placed in the activation arena.
"""

from __future__ import annotations

import torch

from xllm_compiler.ops.reference import rms_norm as reference_rms_norm


def rms_norm_kernel(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim, computed in float32."""
    return reference_rms_norm(x, weight, eps)


rms_norm = torch.library.custom_op("xllm::rms_norm", rms_norm_kernel, mutates_args=())


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


def fused_add_rms_norm_kernel(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual)."""
    summed = x + residual
    return reference_rms_norm(summed, weight, eps), summed


fused_add_rms_norm = torch.library.custom_op("xllm::fused_add_rms_norm", fused_add_rms_norm_kernel, mutates_args=())


@fused_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


def rms_norm_out_kernel(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    torch.mul(weight, h.to(x.dtype), out=out)


rms_norm_out = torch.library.custom_op("xllm::rms_norm_out", rms_norm_out_kernel, mutates_args=("out",))


def fused_add_rms_norm_out_kernel(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor, summed: torch.Tensor
) -> None:
    torch.add(x, residual, out=summed)
    rms_norm_out_kernel(summed, weight, eps, out)


fused_add_rms_norm_out = torch.library.custom_op(
    "xllm::fused_add_rms_norm_out", fused_add_rms_norm_out_kernel, mutates_args=("out", "summed")
)
