"""CPU: always available. Graphs are lowered for it at load:

- every ``xllm::`` op calls its kernel directly (a plain Python call; the dispatcher round trip of
  a Python custom op costs more than the small ops inside it): the fused C++ kernel of
  ops/cpu_kernels.cpp where it could be built, else the torch composite;
- every linear layer on a stored float32 or bfloat16 weight runs ops/cpu_linear.cpp's kernel on a
  copy of the weight packed once, writing into the planned arena buffer. At decode it streams
  weights at about the memory's read bandwidth, where aten.linear's GEMV reaches a third to a half of it
  (docs/performance.md). Where the kernels could not be built, linear layers stay aten.linear on the
  plain weights.
- every ``xllm::moe_experts`` / ``xllm::fused_moe`` on stored float32 or bfloat16 expert stacks runs its
  ``packed_*`` form (ops/moe.py): one C++ call over the stacks packed once per expert, each expert's rows
  through the same packed linear kernel; where the kernels were not built, the grouped composite.
- every ``xllm::linear_w8`` (int8 weights, a compile with ``--quantize int8``) runs ops/cpu_quant.cpp's
  kernel (AVX512-VNNI, else AVX2) on its int8 weight packed once, where it was built and takes the input
  dtype (float32, bfloat16); elsewhere the op's composite runs on the plain int8 weight.
- every ``xllm::linear_w4`` (``--quantize int4``) likewise runs ops/cpu_int4.cpp's AVX2 kernel on its
  weight, scales and offsets packed once (``pack_int4_weight``, ``pack_int4_scales``).

The packing happens as the weights are read (``weight_preparer``, for runtime/weights.py): each linear
weight is packed the moment it arrives and its plain copy dropped, so a load never holds both forms of
the model, only both forms of one tensor. A tied embedding gathers its rows from the packed lm_head
(``packed_embedding``) rather than keep a plain copy of the table: for Llama-3.2-1B that copy was a fifth
of the weights. Only a weight some other op reads keeps its plain copy too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from xllm_compiler.ops import KERNELS, moe
from xllm_compiler.ops.native import native_cpu_kernels, native_kernels
from xllm_compiler.runtime.cpu_replay import CpuGraphRunner
from xllm_compiler.runtime.platform.base import Platform, available_host_memory
from xllm_compiler.runtime.platform.huge_pages import place_in_huge_pages
from xllm_compiler.runtime.platform.shape_ops import TENSOR_METHODS, use_tensor_methods
from xllm_compiler.runtime.replay import RunnerFactory
from xllm_compiler.runtime.weights import PrepareWeight

aten = torch.ops.aten
LINEAR = (aten.linear.default, aten.linear.out)
EMBEDDING = (aten.embedding.default, aten.embedding.out)
INT8_LINEAR = (torch.ops.xllm.linear_w8.default, torch.ops.xllm.linear_w8_out.default)
INT4_LINEAR = (torch.ops.xllm.linear_w4.default, torch.ops.xllm.linear_w4_out.default)
INT4_PARTS = ("qweight", "scale", "offset")  # the stored tensors of an INT4_LINEAR op, each packed for its role
xllm = torch.ops.xllm
EXPERTS = (xllm.moe_experts.default, xllm.moe_experts_out.default, xllm.fused_moe.default, xllm.fused_moe_out.default)
EXPERT_WEIGHTS = ("gate_up", "down")  # the stacked [E, N, K] weights of an EXPERTS op, packed like linear weights
PACKED_SUFFIX = "_packed"


def lowered_targets() -> frozenset:
    """What lowered graphs may call besides allowlisted ops: our kernels (native where built, else
    composites), the packed linear layers and the shape ops' Tensor-method forms (shape_ops.py)."""
    kernels = [*KERNELS.values(), *native_cpu_kernels().values(), *TENSOR_METHODS.values()]
    native = native_kernels()
    if native is None:
        return frozenset(kernels)
    packed = [native.packed_linear_out, native.packed_linear, native.packed_linear_float]
    packed += [native.packed_embedding_out, native.packed_embedding]
    packed += [native.int8_linear_out, native.int8_linear, native.int8_linear_float]
    packed += [native.int4_linear_out, native.int4_linear, native.int4_linear_float]
    return frozenset([*kernels, *packed, *moe.PACKED_KERNELS.values()])


def packable_dtypes() -> set[torch.dtype]:
    native = native_kernels()
    return {getattr(torch, name) for name in native.packed_linear_dtypes()} if native is not None else set()


class CpuPlatform(Platform):
    name = "cpu"

    def is_available(self) -> bool:
        return True

    def free_memory_bytes(self) -> int:
        return available_host_memory()

    def total_memory_bytes(self) -> int:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))

    def weight_preparer(self, graphs: dict[str, fx.Graph]) -> PrepareWeight:
        """Pack each linear layer's weight as it is read; keep a plain copy only where an op other than a
        linear layer or an embedding gather (which reads the packed rows) reads it, and nothing of a tensor
        no graph reads."""
        as_linear, as_gather, as_other, as_experts = _weight_uses(graphs)
        dtypes = packable_dtypes()
        as_quantized = _quantized_linear_packers(graphs)

        def prepare(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
            if name in as_quantized:  # read only by int8/int4 linears, on inputs their kernels take
                return {name + PACKED_SUFFIX: as_quantized[name](tensor)}
            if name in as_linear and tensor.dtype in dtypes and tensor.dim() == 2:
                packed = {name + PACKED_SUFFIX: native_kernels().pack_linear_weight(tensor)}
                return {**packed, name: tensor} if name in as_other else packed
            if name in as_experts and tensor.dtype in dtypes and tensor.dim() == 3:
                packed = {name + PACKED_SUFFIX: native_kernels().pack_expert_weights(tensor)}
                return {**packed, name: tensor} if name in as_linear | as_gather | as_other else packed
            return {name: tensor} if name in as_linear | as_gather | as_other | as_experts else {}

        return prepare

    def place_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """In transparent huge pages (runtime/platform/huge_pages.py): a decode step streams them all."""
        place_in_huge_pages(weights)

    def graph_runner(self) -> RunnerFactory:
        """Bucket graphs replay as their recorded calls, without the generated forward (runtime/cpu_replay.py)."""
        return CpuGraphRunner

    def lower(self, graphs: dict[str, fx.Graph], weights: dict[str, torch.Tensor]) -> None:
        """Rewrite the graphs onto the weights ``weight_preparer`` made: a linear layer (or embedding)
        whose weight was packed runs the packed kernel; what no graph reads any more is dropped."""
        kernels = {**KERNELS, **native_cpu_kernels()}
        for graph in graphs.values():
            for node in list(graph.nodes):
                if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                    continue
                if node.target in INT8_LINEAR and _packed(_argument(node, "qweight")) in weights:
                    _use_int8_linear(graph, node)
                elif node.target in INT4_LINEAR and all(_packed(_argument(node, p)) in weights for p in INT4_PARTS):
                    _use_int4_linear(graph, node)
                elif node.target in EXPERTS and _experts_packed(node, weights):
                    _use_packed_experts(graph, node)
                elif node.target.namespace == "xllm" and node.target.name() in kernels:
                    node.target = kernels[node.target.name()]
                elif node.target in LINEAR and _is_stored(node.args[1]) and _packed(node.args[1]) in weights:
                    _use_packed_linear(graph, node)
                elif node.target in EMBEDDING and _is_stored(node.args[0]) and _only_packed(node.args[0], weights):
                    _use_packed_embedding(graph, node)  # a tied embedding: its table is the packed lm_head
                elif node.target is aten.embedding.out and _is_token_list(node.args[1]):
                    # ATen's embedding.out gathers into a new tensor, then copies; index_select.out
                    # gathers straight into the planned buffer (the same rows: padding_idx only
                    # matters to the gradient).
                    node.target, node.args = aten.index_select.out, (node.args[0], 0, node.args[1])
            for node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
                graph.erase_node(node)  # the plain weight of a now-packed linear
            use_tensor_methods(graph)
        used = {n.target for g in graphs.values() for n in g.nodes if n.op == "get_attr"}
        for name in [name for name in weights if name not in used]:
            del weights[name]


def _weight_uses(graphs: dict[str, fx.Graph]) -> tuple[set[str], set[str], set[str], set[str]]:
    """Stored weights read as a linear layer's weight, as an embedding's table, by anything else, and as the
    expert stacks of an MoE op."""
    as_linear: set[str] = set()
    as_gather: set[str] = set()
    as_other: set[str] = set()
    as_experts: set[str] = set()
    for graph in graphs.values():
        for node in graph.nodes:
            for user in node.users if node.op == "get_attr" else ():
                if user.op == "call_function" and user.target in LINEAR and user.args[1] is node:
                    as_linear.add(node.target)
                elif user.op == "call_function" and user.target in EMBEDDING and user.args[0] is node:
                    as_gather.add(node.target)
                elif user.op == "call_function" and user.target in EXPERTS and _is_expert_weight(user, node):
                    as_experts.add(node.target)
                else:
                    as_other.add(node.target)
    return as_linear, as_gather, as_other, as_experts


def _is_expert_weight(user: fx.Node, weight: fx.Node) -> bool:
    """Whether ``weight`` is an expert stack of the MoE op ``user`` and no other of its arguments."""
    arguments = [*user.args, *user.kwargs.values()]
    stacks = [_argument(user, name) for name in EXPERT_WEIGHTS]
    return any(s is weight for s in stacks) and sum(a is weight for a in arguments) == 1


def _is_stored(weight: object) -> bool:
    return isinstance(weight, fx.Node) and weight.op == "get_attr"


def _packed(weight: fx.Node) -> str:
    return weight.target + PACKED_SUFFIX


def _experts_packed(node: fx.Node, weights: dict[str, torch.Tensor]) -> bool:
    """Whether both expert stacks of MoE op ``node`` are stored weights the preparer packed."""
    stacks = [_argument(node, name) for name in EXPERT_WEIGHTS]
    return all(_is_stored(stack) and _packed(stack) in weights for stack in stacks)


def _only_packed(weight: fx.Node, weights: dict[str, torch.Tensor]) -> bool:
    return _packed(weight) in weights and weight.target not in weights


def _is_token_list(indices: object) -> bool:
    """A 1-d index tensor (index_select's contract), by the shape the artifact recorded for it."""
    meta = indices.meta.get("xllm_meta") if isinstance(indices, fx.Node) else None
    return isinstance(meta, dict) and len(meta.get("shape") or ()) == 1


def _use_packed_linear(graph: fx.Graph, node: fx.Node) -> None:
    native = native_kernels()
    weight = node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    with graph.inserting_before(node):
        packed_node = graph.get_attr(_packed(weight))
    if "out" in node.kwargs:
        node.target, node.args = native.packed_linear_out, (node.args[0], packed_node, bias, node.kwargs["out"])
    else:
        out_features = weight.meta["xllm_meta"]["shape"][0]  # as the artifact records it: the plain may be gone
        node.target, node.args = native.packed_linear, (node.args[0], packed_node, bias, out_features)
        _fold_float32_cast(graph, node, native.packed_linear_float)
    node.kwargs = {}


def _fold_float32_cast(graph: fx.Graph, node: fx.Node, kernel: Any) -> None:
    """Where the bfloat16 result of linear layer ``node`` is only cast to float32 (the LM head's logits), its
    ``*_float`` kernel takes the cast in: each core widens the outputs it computed (cpu_linear.cpp,
    widened_by_blocks), bit for bit the cast's values."""
    cast = next(iter(node.users)) if len(node.users) == 1 else None
    meta = node.meta.get("xllm_meta") or {}
    if cast is not None and meta.get("dtype") == "bfloat16" and _is_float32_cast(cast, node):
        node.target = kernel
        cast.replace_all_uses_with(node)
        graph.erase_node(cast)


def _is_float32_cast(node: fx.Node, source: fx.Node) -> bool:
    """``source.to(torch.float32)``, nothing else asked of the cast (no copy= or memory format)."""
    return node.target is aten.to.dtype and node.args == (source, torch.float32) and not node.kwargs


def _use_packed_experts(graph: fx.Graph, node: fx.Node) -> None:
    """An MoE op over packed expert stacks: its packed form (ops/moe.py), the same arguments with the stacks'
    packed copies, plus the intermediate size as the artifact records it (the packed shapes pad it)."""
    gate_up, down = (_argument(node, name) for name in EXPERT_WEIGHTS)
    with graph.inserting_before(node):
        packed_gate_up, packed_down = graph.get_attr(_packed(gate_up)), graph.get_attr(_packed(down))

    def swap(value: object) -> object:
        return packed_gate_up if value is gate_up else packed_down if value is down else value

    intermediate = down.meta["xllm_meta"]["shape"][2]  # down is [E, H, I]
    kernel = moe.PACKED_KERNELS[node.target.name()]
    node.args = tuple(swap(a) for a in node.args)
    node.kwargs = {**{k: swap(v) for k, v in node.kwargs.items()}, "intermediate": intermediate}
    node.target = kernel


def _use_packed_embedding(graph: fx.Graph, node: fx.Node) -> None:
    native = native_kernels()
    weight, indices = node.args[0], node.args[1]
    rows, k_size = weight.meta["xllm_meta"]["shape"]  # as the artifact records it: only the packed form is here
    with graph.inserting_before(node):
        packed_node = graph.get_attr(_packed(weight))
    if "out" in node.kwargs:
        node.target, node.args = native.packed_embedding_out, (packed_node, indices, rows, node.kwargs["out"])
    else:
        node.target, node.args = native.packed_embedding, (packed_node, indices, rows, k_size)
    node.kwargs = {}


def _argument(node: fx.Node, name: str) -> Any:
    """Argument ``name`` of an op call, positional or keyword (plan_memory passes out forms by keyword)."""
    names = [a.name for a in node.target._schema.arguments]
    return {**dict(zip(names, node.args, strict=False)), **node.kwargs}.get(name)


def _quantized_linear_packers(graphs: dict[str, fx.Graph]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Stored tensors that only the quantized linears read, each always in one role that gets packed (an
    int8 qweight; an int4 qweight for one K and group size, scale or offset), on inputs of a dtype the
    op's kernel (ops/cpu_quant.cpp, ops/cpu_int4.cpp) takes: each with the packing of its role (an empty
    dict where the kernels were not built). An int8 scale is read as it is, so it is in no role."""
    native = native_kernels()
    if native is None:
        return {}
    kinds = {target: (("qweight",), set(native.int8_linear_dtypes())) for target in INT8_LINEAR}
    kinds |= {target: (INT4_PARTS, set(native.int4_linear_dtypes())) for target in INT4_LINEAR}
    roles: dict[str, set[tuple | None]] = {}
    for graph in graphs.values():
        for node in graph.nodes:
            for user in node.users if node.op == "get_attr" else ():
                roles.setdefault(node.target, set()).add(_quantized_role(user, node, kinds))
    packers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for name, found in roles.items():
        if len(found) != 1 or None in found:
            continue
        (role,) = found
        if role[0] == "int8":
            packers[name] = native.pack_int8_weight
        elif role[0] == "qweight":
            packers[name] = lambda t, k=role[1], g=role[2]: native.pack_int4_weight(t, k, g)
        else:
            packers[name] = native.pack_int4_scales
    return packers


def _quantized_role(user: fx.Node, node: fx.Node, kinds: dict) -> tuple | None:
    """What stored tensor ``node`` is to ``user`` where its kernel can take it: ('int8',) for an int8
    qweight; ('qweight', K, group size), ('scale',) or ('offset',) for int4; None if ``user`` is no
    quantized linear, one its kernel does not take, or ``node`` is none of its packed parts."""
    kind = kinds.get(user.target) if user.op == "call_function" else None
    if kind is None:
        return None
    packed_parts, dtypes = kind
    x = _argument(user, "x")
    meta = x.meta.get("xllm_meta") if isinstance(x, fx.Node) else None
    parts = [part for part in packed_parts if _argument(user, part) is node]
    if not isinstance(meta, dict) or meta.get("dtype") not in dtypes or len(parts) != 1:
        return None
    if sum(a is node for a in [*user.args, *user.kwargs.values()]) != 1:
        return None
    if user.target in INT8_LINEAR:
        return ("int8",)
    return (parts[0], meta["shape"][-1], _argument(user, "group_size")) if parts[0] == "qweight" else (parts[0],)


def _use_int4_linear(graph: fx.Graph, node: fx.Node) -> None:
    native = native_kernels()
    qweight, scale, offset = (_argument(node, part) for part in INT4_PARTS)
    x, group_size, bias = (_argument(node, name) for name in ("x", "group_size", "bias"))
    with graph.inserting_before(node):
        packed = [graph.get_attr(_packed(part)) for part in (qweight, scale, offset)]
    if node.target is torch.ops.xllm.linear_w4_out.default:
        node.target, node.args = native.int4_linear_out, (x, *packed, group_size, bias, _argument(node, "out"))
    else:
        out_features = qweight.meta["xllm_meta"]["shape"][0]  # as the artifact records it: the plain is gone
        node.target, node.args = native.int4_linear, (x, *packed, group_size, bias, out_features)
        _fold_float32_cast(graph, node, native.int4_linear_float)
    node.kwargs = {}


def _use_int8_linear(graph: fx.Graph, node: fx.Node) -> None:
    native = native_kernels()
    qweight = _argument(node, "qweight")
    x, scale, bias = (_argument(node, name) for name in ("x", "scale", "bias"))
    with graph.inserting_before(node):
        packed_node = graph.get_attr(_packed(qweight))
    if node.target is torch.ops.xllm.linear_w8_out.default:
        node.target, node.args = native.int8_linear_out, (x, packed_node, scale, bias, _argument(node, "out"))
    else:
        out_features = qweight.meta["xllm_meta"]["shape"][0]  # as the artifact records it: the plain is gone
        node.target, node.args = native.int8_linear, (x, packed_node, scale, bias, out_features)
        _fold_float32_cast(graph, node, native.int8_linear_float)
    node.kwargs = {}
