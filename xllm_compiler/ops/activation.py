"""``xllm::silu_and_mul``: SwiGLU's elementwise half on the merged gate/up projection.

Takes ``gate_up [..., 2 * d]`` (gate first) and returns ``silu(gate) * up [..., d]``: the layout the
merged gate/up matmul produces, and the one fused kernels take (vLLM's SiluAndMul, torch_npu's
npu_swiglu), so no split is ever materialised.
"""

from __future__ import annotations

import torch

from xllm_compiler.ops.reference import silu_and_mul as reference_silu_and_mul


def silu_and_mul_kernel(gate_up: torch.Tensor) -> torch.Tensor:
    half = gate_up.shape[-1] // 2
    return reference_silu_and_mul(gate_up[..., :half], gate_up[..., half:])


silu_and_mul = torch.library.custom_op("xllm::silu_and_mul", silu_and_mul_kernel, mutates_args=())


@silu_and_mul.register_fake
def _(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


def silu_and_mul_out_kernel(gate_up: torch.Tensor, out: torch.Tensor) -> None:
    half = gate_up.shape[-1] // 2
    torch.mul(torch.nn.functional.silu(gate_up[..., :half]), gate_up[..., half:], out=out)


silu_and_mul_out = torch.library.custom_op("xllm::silu_and_mul_out", silu_and_mul_out_kernel, mutates_args=("out",))
