"""Collectives as graph ops: torch's functional collectives, so that passes can see and move them.

``all_reduce`` issues ``_c10d_functional.all_reduce`` and waits with ``wait_tensor``: two nodes, the
issue and the wait, which the overlap passes pull apart. The group is named by a string traced into
the graph; the runtime binds it to the real process group when it loads a tensor-parallel artifact.
"""

from __future__ import annotations

import torch

from xllm_compiler.ops.norm import fused_add_rms_norm_kernel

funcol = torch.ops._c10d_functional


def all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum of ``x`` over the group's ranks."""
    return funcol.wait_tensor.default(funcol.all_reduce.default(x, "sum", group_name))


def all_reduce_add_rms_norm_kernel(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(all_reduce(x) + residual), all_reduce(x) + residual): the end of a tensor-parallel
    sublayer in one op, for platforms that fuse it; elsewhere this composite."""
    return fused_add_rms_norm_kernel(all_reduce(x, group_name), residual, weight, eps)


all_reduce_add_rms_norm = torch.library.custom_op(
    "xllm::all_reduce_add_rms_norm", all_reduce_add_rms_norm_kernel, mutates_args=()
)


@all_reduce_add_rms_norm.register_fake
def _(x, residual, weight, eps, group_name):
    return torch.empty_like(x), torch.empty_like(x)
