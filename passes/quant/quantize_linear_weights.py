"""Quantize the weight of every linear layer at compile time: ``aten.linear`` becomes ``xllm::linear_w8``
(``int8``) or ``xllm::linear_w4`` (``int4``).

Before:  y = linear(x, W, b)                      (W a stored float weight [N, K])
After:   y = xllm.linear_w8(x, Wq, scale, b)      (Wq int8 [N, K], scale float32 [N]: W ~= Wq * scale)
   or:   y = xllm.linear_w4(x, Wq, scale, offset, group_size, b)
         (Wq uint8 [N, ceil(K/2)], two 4-bit values a byte; scale, offset float32 [N, ceil(K/group_size)]:
         W ~= Wq * scale + offset within each group of group_size inputs; ops/quant.py)
Runs after the projection merges and ``fold_constants``, so a merged QKV or gate/up weight is quantized as
one tensor (its scales are per output row, so merging first changes nothing but the tensor count).
The artifact stores ``<weight>_int8`` and ``<weight>_scale`` (int8), or ``<weight>_int4``, ``<weight>_scale``
and ``<weight>_offset`` (int4), instead of the float weight; a float weight some other op still reads (a
tied embedding's table) stays too. Declines linears whose weight is not a stored 2-d float tensor, and the
LM head when ``lm_head`` is off. The MoE experts (``xllm::moe_experts``) and anything but ``aten.linear``
keep their float weights.

Why int4 is group-wise and asymmetric: sixteen levels spread over a whole row would put most weights of a
row within a step or two of zero; a group of 32 to 128 inputs gets a range of its own, and a min/max offset
spends all sixteen levels on that range. It costs 4 bits a weight plus a float32 scale and offset per group,
64 / group_size bits: 4.5 bits at the default group of 128, the same as llama.cpp's Q4_0 (4 bits plus a
float16 scale per block of 32), 5 at 64, 6 at 32.

Why the LM head is quantized by default: on the ~100M Llama of tools/bench.py it is 24.6M of the 97.8M
weights a decode step reads (25% of the bytes), and per-channel int8 gives each vocabulary row a scale of
its own, so its logits move no more than any other layer's outputs (tools/bench_quant.py measures both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch._guards import detect_fake_mode

from xllm_compiler.ops.quant import DEFAULT_GROUP_SIZE, GROUP_SIZES, quantize_per_channel, quantize_per_group
from xllm_compiler.passes.cleanup.eliminate_dead_code import delete_unused_attributes
from xllm_compiler.passes.fusion.linear_groups import linear_parts
from xllm_compiler.passes.graph_pass import GraphPass, PassResult

#: The schemes this pass knows (xllm_compiler/options.py refuses any other by name before a compile starts).
SCHEMES = ("int8", "int4")
MAX_HOPS_TO_OUTPUT = 3  # the LM head's result reaches the output through a cast or a view


@dataclass(frozen=True)
class QuantizeOptions:
    scheme: str | None = None
    """'int8' (symmetric, per output channel, float32 scales), 'int4' (asymmetric, per group of
    ``group_size`` inputs, float32 scales and offsets); None leaves every weight as it is."""
    lm_head: bool = True
    """Whether the LM head (the linear whose result is the graph's output) is quantized too."""
    group_size: int = DEFAULT_GROUP_SIZE
    """int4: consecutive inputs of a row sharing one scale and offset (one of GROUP_SIZES); int8 ignores it."""

    def __post_init__(self) -> None:
        if self.scheme is not None and self.scheme not in SCHEMES:
            raise ValueError(f"quantize_linear_weights: no scheme '{self.scheme}' (known: {', '.join(SCHEMES)})")
        if self.group_size not in GROUP_SIZES:
            sizes = ", ".join(map(str, GROUP_SIZES))
            raise ValueError(f"quantize_linear_weights: no group size {self.group_size!r} (known: {sizes})")


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


def _quantized(gm: fx.GraphModule, target: str, options: QuantizeOptions) -> tuple[str, ...]:
    """Store the quantized form of the weight ``target`` beside it; the names of what the op reads."""
    value = _stored(gm, target)
    if options.scheme == "int4":
        q, scale, offset = quantize_per_group(value, options.group_size)
        return (
            _store(gm, target, "_int4", q),
            _store(gm, target, "_scale", scale),
            _store(gm, target, "_offset", offset),
        )
    q, scale = quantize_per_channel(value)
    return _store(gm, target, "_int8", q), _store(gm, target, "_scale", scale)


class QuantizeLinearWeights(GraphPass):
    """Rewrite linears on stored float weights into ``xllm::linear_w8`` on int8 weights and scales, or
    ``xllm::linear_w4`` on packed int4 weights, scales and offsets."""

    name = "quantize_linear_weights"
    version = 2

    def __init__(self, options: QuantizeOptions | None = None):
        self.options = options or QuantizeOptions()

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        if self.options.scheme is None:
            return PassResult(changed=False)
        graph = gm.graph
        fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if "val" in n.meta])
        quantized: dict[str, tuple[str, ...]] = {}  # float weight -> what the op reads, one copy if shared
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
                quantized[weight.target] = _quantized(gm, weight.target, self.options)
            names = quantized[weight.target]
            with graph.inserting_before(node):
                attrs = [graph.get_attr(name) for name in names]
                if self.options.scheme == "int4":
                    op, args = torch.ops.xllm.linear_w4.default, (x, *attrs, self.options.group_size, bias)
                else:
                    op, args = torch.ops.xllm.linear_w8.default, (x, *attrs, bias)
                new = graph.call_function(op, args)
            for attr, stored_name in zip(attrs, names, strict=True):
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
