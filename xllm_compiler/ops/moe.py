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

On the CPU with the native kernels built, the platform lowers all four ops to ``packed_*`` forms instead
(runtime/platform/cpu.py): the stacked weights are packed once at load (``pack_expert_weights``, one
packed matrix per expert, ops/cpu_linear.cpp's layout) and one C++ call groups the rows, runs each expert
through the packed linear kernel (gate and up merged), SiLU·mul, the down projection and the weighted
combine, in the same order and rounding as the grouped kernel, which stays the reference and the fallback.
The routing of ``fused_moe`` and the counting run in native loops there too (ops/cpu_moe_routing.cpp).

``xllm::fused_moe`` takes the router logits instead of the routing: softmax, top-k and the renormalising
(``reference.route_topk``) happen inside, so a device kernel can route and dispatch in one launch. The
``fuse_moe`` pass makes it from the reference routing and ``moe_experts``.

With expert parallelism an op holds only some experts' weights, and ``expert_table [E * R]`` (int64, a
weight of each rank, R = ``replicas``: columns per expert) says which: entry ``e * R + j`` is the row of
``gate_up``/``down`` that serves column ``j`` of routed expert ``e`` on this rank, or -1 where another
rank serves it. A token takes column ``slot_mapping % R`` (its KV slot: deterministic and the same on
every rank, and unlike the token's row it moves with the position, so even one sequence's decode steps
spread over the replicas of a placement plan, xllm_compiler/experts). Each (token, expert) pair is thus
computed by exactly one rank, and an all-reduce of the ranks' partial sums is the layer's output. The
table is data, not a literal, so that every rank runs the very same graph; it is 1-D because the
micro-batch split takes a 2-D operand of another height than the tokens' for a non-row-wise one.

``expert_counts [E + 1]`` (int64, optional, written in place) receives the routing of real tokens: the
count of each expert, then of tokens; ``slot_mapping`` tells padding (the reserved slot) apart on the
device, so counting needs no host read and a captured graph can do it (``CompiledModel.expert_stats``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xllm_compiler.interface import PAD_SLOT
from xllm_compiler.ops.native import native_kernels
from xllm_compiler.ops.reference import route_topk, silu_and_mul

__all__ = [
    "CAPTURE_SAFE_KERNELS",
    "PACKED_KERNELS",
    "capture_safe_moe_experts",
    "capture_safe_moe_experts_out",
    "fused_moe",
    "fused_moe_kernel",
    "fused_moe_out",
    "fused_moe_out_kernel",
    "local_expert_ids",
    "moe_experts",
    "moe_experts_kernel",
    "moe_experts_out",
    "moe_experts_out_kernel",
    "packed_fused_moe",
    "packed_fused_moe_out",
    "packed_moe_experts",
    "packed_moe_experts_out",
]


def _expert(rows: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU MLP over ``rows`` [n, H] -> [n, H]."""
    y = F.linear(rows, gate_up)
    half = y.shape[-1] // 2
    return F.linear(silu_and_mul(y[:, :half], y[:, half:]), down)


def local_expert_ids(
    topk_ids: torch.Tensor,
    expert_table: torch.Tensor | None,
    replicas: int = 1,
    slot_mapping: torch.Tensor | None = None,
) -> torch.Tensor:
    """[T, k] rows of this op's stacked weights for each routed expert, -1 where another rank holds it."""
    if expert_table is None:
        return topk_ids
    token = slot_mapping if slot_mapping is not None else torch.arange(topk_ids.shape[0], device=topk_ids.device)
    return expert_table[topk_ids * replicas + (token % replicas)[:, None]]


def count_routed(topk_ids: torch.Tensor, expert_counts: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Add each real token's routed experts into ``expert_counts [E + 1]`` (int64; the last entry counts
    the tokens). Padding tokens, those writing to the reserved KV slot, are masked on the device: no host
    read, so a captured graph can do it, and the counts hold real tokens only."""
    real = (slot_mapping != PAD_SLOT).to(expert_counts.dtype)  # [T]
    expert_counts.index_add_(0, topk_ids.reshape(-1), real.repeat_interleave(topk_ids.shape[1]))
    expert_counts[-1:].add_(real.sum())


def _grouped_moe_experts_out(hidden, topk_weights, topk_ids, gate_up, down, out, local_ids) -> None:
    out.zero_()
    top_k = topk_ids.shape[1]
    flat = local_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, token order kept
    tokens = order // top_k
    weights = topk_weights.reshape(-1)[order]
    counts = torch.bincount(flat + 1, minlength=gate_up.shape[0] + 1).tolist()
    start = counts[0]  # the pairs other ranks compute (-1) sort first
    for expert, count in enumerate(counts[1:]):
        if count:
            rows = tokens[start : start + count]
            y = _expert(hidden[rows], gate_up[expert], down[expert]) * weights[start : start + count, None]
            out.index_add_(0, rows, y.to(out.dtype))
            start += count


def _dense_moe_experts_out(hidden, topk_weights, topk_ids, gate_up, down, out, local_ids) -> None:
    """Every expert over every row, weighted by its (zero where not chosen) routing weight."""
    out.zero_()
    for expert in range(gate_up.shape[0]):
        weight = (topk_weights * (local_ids == expert)).sum(-1, keepdim=True)  # [T, 1]
        out.add_((_expert(hidden, gate_up[expert], down[expert]) * weight).to(out.dtype))


def _experts_out(implementation):
    """A moe_experts out-form kernel: count the routing (when given a counts buffer), then run the experts."""

    def experts_out(
        hidden: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        out: torch.Tensor,
        expert_table: torch.Tensor | None = None,
        replicas: int = 1,
        expert_counts: torch.Tensor | None = None,
        slot_mapping: torch.Tensor | None = None,
    ) -> None:
        local = _counted_local_ids(topk_ids, expert_table, replicas, expert_counts, slot_mapping)
        implementation(hidden, topk_weights, topk_ids, gate_up, down, out, local)

    return experts_out


def _counted_local_ids(topk_ids, expert_table, replicas, expert_counts, slot_mapping) -> torch.Tensor:
    """Count the routing (when given a counts buffer); this op's rows of the stacked weights per routed expert."""
    if expert_counts is not None and slot_mapping is not None:
        count_routed(topk_ids, expert_counts, slot_mapping)
    return local_expert_ids(topk_ids, expert_table, replicas, slot_mapping)


def _by_device(hidden, topk_weights, topk_ids, gate_up, down, out, local_ids) -> None:
    implementation = _grouped_moe_experts_out if hidden.device.type == "cpu" else _dense_moe_experts_out
    implementation(hidden, topk_weights, topk_ids, gate_up, down, out, local_ids)


capture_safe_moe_experts_out = _experts_out(_dense_moe_experts_out)
moe_experts_out_kernel = _experts_out(_by_device)


def _functional_experts(experts_out):
    """The functional form of a moe_experts out-form kernel."""

    def experts(
        hidden: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        expert_table: torch.Tensor | None = None,
        replicas: int = 1,
        expert_counts: torch.Tensor | None = None,
        slot_mapping: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = torch.empty_like(hidden)
        routing = (expert_table, replicas, expert_counts, slot_mapping)
        experts_out(hidden, topk_weights, topk_ids, gate_up, down, out, *routing)
        return out

    return experts


capture_safe_moe_experts = _functional_experts(capture_safe_moe_experts_out)
moe_experts_kernel = _functional_experts(moe_experts_out_kernel)
moe_experts = torch.library.custom_op("xllm::moe_experts", moe_experts_kernel, mutates_args=("expert_counts",))


@moe_experts.register_fake
def _(
    hidden, topk_weights, topk_ids, gate_up, down, expert_table=None, replicas=1, expert_counts=None, slot_mapping=None
):
    return torch.empty_like(hidden)


moe_experts_out = torch.library.custom_op(
    "xllm::moe_experts_out", moe_experts_out_kernel, mutates_args=("out", "expert_counts")
)


def _route(hidden, router_logits, top_k, renormalise, weights_in_hidden_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    weights, ids = route_topk(router_logits, top_k, renormalise)
    return (weights.to(hidden.dtype) if weights_in_hidden_dtype else weights), ids


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
        expert_table: torch.Tensor | None = None,
        replicas: int = 1,
        expert_counts: torch.Tensor | None = None,
        slot_mapping: torch.Tensor | None = None,
    ) -> None:
        weights, ids = _route(hidden, router_logits, top_k, renormalise, weights_in_hidden_dtype)
        experts_out(hidden, weights, ids, gate_up, down, out, expert_table, replicas, expert_counts, slot_mapping)

    return fused_out


def _functional(fused_out):
    """The functional form of a fused_moe out-form kernel."""

    def fused(
        hidden: torch.Tensor,
        router_logits: torch.Tensor,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        top_k: int,
        renormalise: bool,
        weights_in_hidden_dtype: bool,
        expert_table: torch.Tensor | None = None,
        replicas: int = 1,
        expert_counts: torch.Tensor | None = None,
        slot_mapping: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = torch.empty_like(hidden)
        routing = (
            top_k,
            renormalise,
            weights_in_hidden_dtype,
            out,
            expert_table,
            replicas,
            expert_counts,
            slot_mapping,
        )
        fused_out(hidden, router_logits, gate_up, down, *routing)
        return out

    return fused


fused_moe_out_kernel = _routed(moe_experts_out_kernel)
capture_safe_fused_moe_out = _routed(capture_safe_moe_experts_out)
capture_safe_fused_moe = _functional(capture_safe_fused_moe_out)
fused_moe_kernel = _functional(fused_moe_out_kernel)
fused_moe = torch.library.custom_op("xllm::fused_moe", fused_moe_kernel, mutates_args=("expert_counts",))


@fused_moe.register_fake
def _(
    hidden,
    router_logits,
    gate_up,
    down,
    top_k,
    renormalise,
    weights_in_hidden_dtype,
    expert_table=None,
    replicas=1,
    expert_counts=None,
    slot_mapping=None,
):
    return torch.empty_like(hidden)


fused_moe_out = torch.library.custom_op(
    "xllm::fused_moe_out", fused_moe_out_kernel, mutates_args=("out", "expert_counts")
)

#: The capture-safe kernel of each op whose ops.KERNELS entry reads group sizes on the host on the CPU.
CAPTURE_SAFE_KERNELS = {
    "xllm::moe_experts": capture_safe_moe_experts,
    "xllm::moe_experts_out": capture_safe_moe_experts_out,
    "xllm::fused_moe": capture_safe_fused_moe,
    "xllm::fused_moe_out": capture_safe_fused_moe_out,
}


# -- the CPU platform's lowering: the same ops over expert weights packed at load (ops/cpu_linear.cpp) ----------
# Each takes its op's arguments, with gate_up and down the packed stacks (pack_expert_weights) and, by keyword,
# ``intermediate``: I, which the packed shapes do not pin down (a bfloat16 stack pads K to even), given by the
# lowering from the shapes the artifact records, as packed_linear gets its out_features.


def packed_moe_experts_out(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    out: torch.Tensor,
    expert_table: torch.Tensor | None = None,
    replicas: int = 1,
    expert_counts: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    *,
    intermediate: int,
) -> None:
    native = native_kernels()
    if expert_counts is not None and slot_mapping is not None:
        native.count_routed(topk_ids, expert_counts, slot_mapping, PAD_SLOT)  # count_routed's loop, on the host
    local = local_expert_ids(topk_ids, expert_table, replicas, slot_mapping)
    native.packed_moe_experts_out(hidden, topk_weights, local, gate_up, down, intermediate, out)


def packed_moe_experts(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    expert_table: torch.Tensor | None = None,
    replicas: int = 1,
    expert_counts: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    *,
    intermediate: int,
) -> torch.Tensor:
    out = torch.empty_like(hidden)
    routing = (expert_table, replicas, expert_counts, slot_mapping)
    packed_moe_experts_out(hidden, topk_weights, topk_ids, gate_up, down, out, *routing, intermediate=intermediate)
    return out


def packed_fused_moe_out(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    renormalise: bool,
    weights_in_hidden_dtype: bool,
    out: torch.Tensor,
    expert_table: torch.Tensor | None = None,
    replicas: int = 1,
    expert_counts: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    *,
    intermediate: int,
) -> None:
    weights, ids = native_kernels().route_topk(router_logits, top_k, renormalise)  # route_topk, one native call
    weights = weights.to(hidden.dtype) if weights_in_hidden_dtype else weights
    routing = (expert_table, replicas, expert_counts, slot_mapping)
    packed_moe_experts_out(hidden, weights, ids, gate_up, down, out, *routing, intermediate=intermediate)


def packed_fused_moe(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    renormalise: bool,
    weights_in_hidden_dtype: bool,
    expert_table: torch.Tensor | None = None,
    replicas: int = 1,
    expert_counts: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    *,
    intermediate: int,
) -> torch.Tensor:
    out = torch.empty_like(hidden)
    routing = (top_k, renormalise, weights_in_hidden_dtype, out, expert_table, replicas, expert_counts, slot_mapping)
    packed_fused_moe_out(hidden, router_logits, gate_up, down, *routing, intermediate=intermediate)
    return out


#: The packed form of each op, for the CPU platform's lowering (runtime/platform/cpu.py).
PACKED_KERNELS = {
    "xllm::moe_experts": packed_moe_experts,
    "xllm::moe_experts_out": packed_moe_experts_out,
    "xllm::fused_moe": packed_fused_moe,
    "xllm::fused_moe_out": packed_fused_moe_out,
}
