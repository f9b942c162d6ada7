"""Quantize the weight of every linear layer at compile time: ``aten.linear`` becomes ``xllm::linear_w8``.

Before:  y = linear(x, W, b)                      (W a stored float weight [N, K])
After:   y = xllm.linear_w8(x, Wq, scale, b)      (Wq int8 [N, K], scale float32 [N]: W ~= Wq * scale)
Runs after the projection merges and ``fold_constants``, so a merged QKV or gate/up weight is quantized as
one tensor (its scales are per output channel, so merging first changes nothing but the tensor count).
The artifact stores ``<weight>_int8`` and ``<weight>_scale`` instead of the float weight; a float weight
some other op still reads (a tied embedding's table) stays too. Declines linears whose weight is not a
stored 2-d float tensor, and the LM head when ``lm_head`` is off. The MoE experts (``xllm::moe_experts``)
and anything but ``aten.linear`` keep their float weights.

Why the LM head is quantized by default: on the ~100M Llama of tools/bench.py it is 24.6M of the 97.8M
weights a decode step reads (25% of the bytes), and per-channel int8 gives each vocabulary row a scale of
its own, so its logits move no more than any other layer's outputs (tools/bench_quant.py measures both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch._guards import detect_fake_mode

from xllm_compiler.ops.quant import quantize_per_channel
from xllm_compiler.passes.cleanup.eliminate_dead_code import delete_unused_attributes
from xllm_compiler.passes.fusion.linear_groups import linear_parts
from xllm_compiler.passes.graph_pass import GraphPass, PassResult

#: The schemes this pass knows (xllm_compiler/options.py refuses any other by name before a compile starts).
SCHEMES = ("int8",)
MAX_HOPS_TO_OUTPUT = 3  # the LM head's result reaches the output through a cast or a view


@dataclass(frozen=True)
class QuantizeOptions:
    scheme: str | None = None
    """'int8' (symmetric, per output channel, float32 scales); None leaves every weight as it is."""
    lm_head: bool = True
    """Whether the LM head (the linear whose result is the graph's output) is quantized too."""

    def __post_init__(self) -> None:
        if self.scheme is not None and self.scheme not in SCHEMES:
            raise ValueError(f"quantize_linear_weights: no scheme '{self.scheme}' (known: {', '.join(SCHEMES)})")


def _stored(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, leaf = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, leaf)


def _store(gm: fx.GraphModule, target: str, suffix: str, tensor: torch.Tensor) -> str:
    """Register ``tensor`` beside the weight ``target`` as ``<target><suffix>`` (made unique)."""
    owner, _, leaf = target.rpartition(".")
    holder = gm.get_submodule(owner) if owner else gm
    name, n = f"{leaf}{suffix}", 1
    while hasattr(holder, name):
        name, n = f"{leaf}{suffix}_{n}", n + 1
    holder.register_buffer(name, tensor)
    return f"{owner}.{name}" if owner else name


def _is_lm_head(node: fx.Node) -> bool:
    """Whether ``node``'s result is (a cast or view of) the graph's output."""
    frontier = [node]
    for _ in range(MAX_HOPS_TO_OUTPUT + 1):
        if any(user.op == "output" for n in frontier for user in n.users):
            return True
        frontier = [user for n in frontier for user in n.users if len(n.users) == 1]
    return False


class QuantizeLinearWeights(GraphPass):
    """Rewrite linears on stored float weights into ``xllm::linear_w8`` on int8 weights and scales."""

    name = "quantize_linear_weights"
    version = 1

    def __init__(self, options: QuantizeOptions | None = None):
        self.options = options or QuantizeOptions()

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        if self.options.scheme is None:
            return PassResult(changed=False)
        graph = gm.graph
        fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if "val" in n.meta])
        quantized: dict[str, tuple[str, str]] = {}  # float weight -> (int8 weight, scales), one copy if shared
        matches = 0
        for node in list(graph.nodes):
            parts = linear_parts(node)
            if parts is None or (not self.options.lm_head and _is_lm_head(node)):
                continue
            x, weight, bias = parts
            value = _stored(gm, weight.target)
            if value.dim() != 2 or not value.is_floating_point():
                continue
            if weight.target not in quantized:
                q, scale = quantize_per_channel(value)
                quantized[weight.target] = (
                    _store(gm, weight.target, "_int8", q),
                    _store(gm, weight.target, "_scale", scale),
                )
            names = quantized[weight.target]
            with graph.inserting_before(node):
                q_node, scale_node = graph.get_attr(names[0]), graph.get_attr(names[1])
                new = graph.call_function(torch.ops.xllm.linear_w8.default, (x, q_node, scale_node, bias))
            for attr, stored_name in zip((q_node, scale_node), names, strict=True):
                tensor = _stored(gm, stored_name)
                attr.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode else tensor
            new.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            matches += 1
        if matches:
            graph.eliminate_dead_code()
            delete_unused_attributes(gm)
        return PassResult(changed=bool(matches), matches=matches)


quantize_linear_weights = QuantizeLinearWeights()
