"""``xllm::moe_experts`` and ``xllm::fused_moe``: the routed experts of a mixture-of-experts layer, as one op.

``hidden [T, H]`` rows go to the experts ``topk_ids [T, k]`` names, each scaled by its ``topk_weights
[T, k]`` (float32, or the model dtype where the architecture casts them back, as Qwen does) and summed
into a [T, H] result of hidden's dtype. Experts are stacked: ``gate_up [E, 2I, H]`` (gate rows first,
the merged gate/up projection of every expert) and ``down [E, H, I]``. The op keeps the graph one node
per layer however many experts there are, and is the seam a fused kernel (torch_npu's grouped matmul,
vLLM's fused_moe) plugs into.

Two torch implementations, chosen by device as attention's are:

- On the CPU the rows are grouped by expert (a stable sort of the flattened ids) and each expert runs
  only its own rows: ``T * k`` rows of work, not ``T * E``. The group sizes are read on the host, so
  it cannot be captured; nothing is captured on the CPU.
- Everywhere else ``capture_safe_moe_experts_out`` runs every expert over every row and masks the
  weights: static shapes, no host read, so CUDA graphs and aclgraph can record it (the capture-safety
  audit checks it). Dense, so E/k times the work: a placeholder until a device kernel takes the op.

Both accumulate expert by expert in ascending id order into a zeroed buffer of hidden's dtype, as
transformers' experts loop does, so results agree with it in bf16 too. Padding rows are computed and
dropped by the caller like any other padding.

``xllm::fused_moe`` takes the router logits instead of the routing: softmax, top-k and the renormalising
(``reference.route_topk``) happen inside, so a device kernel can route and dispatch in one launch. The
``fuse_moe`` pass makes it from the reference routing and ``moe_experts``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xllm_compiler.ops.reference import route_topk, silu_and_mul

__all__ = [
    "CAPTURE_SAFE_KERNELS",
    "capture_safe_moe_experts",
    "capture_safe_moe_experts_out",
    "fused_moe",
    "fused_moe_kernel",
    "fused_moe_out",
    "fused_moe_out_kernel",
    "moe_experts",
    "moe_experts_kernel",
    "moe_experts_out",
    "moe_experts_out_kernel",
]


def _expert(rows: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU MLP over ``rows`` [n, H] -> [n, H]."""
    y = F.linear(rows, gate_up)
    half = y.shape[-1] // 2
    return F.linear(silu_and_mul(y[:, :half], y[:, half:]), down)


def _grouped_moe_experts_out(hidden, topk_weights, topk_ids, gate_up, down, out) -> None:
    out.zero_()
    top_k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, token order kept
    tokens = order // top_k
    weights = topk_weights.reshape(-1)[order]
    start = 0
    for expert, count in enumerate(torch.bincount(flat, minlength=gate_up.shape[0]).tolist()):
        if count:
            rows = tokens[start : start + count]
            y = _expert(hidden[rows], gate_up[expert], down[expert]) * weights[start : start + count, None]
            out.index_add_(0, rows, y.to(out.dtype))
            start += count


def capture_safe_moe_experts_out(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Every expert over every row, weighted by its (zero where not chosen) routing weight."""
    out.zero_()
    for expert in range(gate_up.shape[0]):
        weight = (topk_weights * (topk_ids == expert)).sum(-1, keepdim=True)  # [T, 1]
        out.add_((_expert(hidden, gate_up[expert], down[expert]) * weight).to(out.dtype))


def capture_safe_moe_experts(
    hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    out = torch.empty_like(hidden)
    capture_safe_moe_experts_out(hidden, topk_weights, topk_ids, gate_up, down, out)
    return out


def moe_experts_out_kernel(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    out: torch.Tensor,
) -> None:
    implementation = _grouped_moe_experts_out if hidden.device.type == "cpu" else capture_safe_moe_experts_out
    implementation(hidden, topk_weights, topk_ids, gate_up, down, out)


def moe_experts_kernel(
    hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    out = torch.empty_like(hidden)
    moe_experts_out_kernel(hidden, topk_weights, topk_ids, gate_up, down, out)
    return out


moe_experts = torch.library.custom_op("xllm::moe_experts", moe_experts_kernel, mutates_args=())


@moe_experts.register_fake
def _(hidden, topk_weights, topk_ids, gate_up, down):
    return torch.empty_like(hidden)


moe_experts_out = torch.library.custom_op("xllm::moe_experts_out", moe_experts_out_kernel, mutates_args=("out",))


def _routed(experts_out):
    """A fused_moe out-form kernel over an experts out-form kernel: route, then run the experts."""

    def fused_out(
        hidden: torch.Tensor,
        router_logits: torch.Tensor,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        top_k: int,
        renormalise: bool,
        weights_in_hidden_dtype: bool,
        out: torch.Tensor,
    ) -> None:
        weights, ids = route_topk(router_logits, top_k, renormalise)
        experts_out(hidden, weights.to(hidden.dtype) if weights_in_hidden_dtype else weights, ids, gate_up, down, out)

    return fused_out


def _functional(fused_out):
    """The functional form of a fused_moe out-form kernel."""

    def fused(hidden, router_logits, gate_up, down, top_k, renormalise, weights_in_hidden_dtype) -> torch.Tensor:
        out = torch.empty_like(hidden)
        fused_out(hidden, router_logits, gate_up, down, top_k, renormalise, weights_in_hidden_dtype, out)
        return out

    return fused


fused_moe_out_kernel = _routed(moe_experts_out_kernel)
capture_safe_fused_moe_out = _routed(capture_safe_moe_experts_out)
capture_safe_fused_moe = _functional(capture_safe_fused_moe_out)


def fused_moe_kernel(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    renormalise: bool,
    weights_in_hidden_dtype: bool,
) -> torch.Tensor:
    out = torch.empty_like(hidden)
    fused_moe_out_kernel(hidden, router_logits, gate_up, down, top_k, renormalise, weights_in_hidden_dtype, out)
    return out


fused_moe = torch.library.custom_op("xllm::fused_moe", fused_moe_kernel, mutates_args=())


@fused_moe.register_fake
def _(hidden, router_logits, gate_up, down, top_k, renormalise, weights_in_hidden_dtype):
    return torch.empty_like(hidden)


fused_moe_out = torch.library.custom_op("xllm::fused_moe_out", fused_moe_out_kernel, mutates_args=("out",))

#: The capture-safe kernel of each op whose ops.KERNELS entry reads group sizes on the host on the CPU.
CAPTURE_SAFE_KERNELS = {
    "xllm::moe_experts": capture_safe_moe_experts,
    "xllm::moe_experts_out": capture_safe_moe_experts_out,
    "xllm::fused_moe": capture_safe_fused_moe,
    "xllm::fused_moe_out": capture_safe_fused_moe_out,
}
