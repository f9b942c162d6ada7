"""CPU: always available. Graphs are lowered for it at load:

- every ``xllm::`` op calls its kernel directly (a plain Python call; the dispatcher round trip of
  a Python custom op costs more than the small ops inside it): the fused C++ kernel of
  ops/cpu_kernels.cpp where it could be built, else the torch composite;
- every linear layer on a stored float32 or bfloat16 weight runs ops/cpu_linear.cpp's kernel on a
  copy of the weight packed once here, writing into the planned arena buffer. At decode it streams
  weights at about the memory's read bandwidth, where aten.linear's GEMV reaches a third to a half of it
  (docs/performance.md). The plain weight is dropped when nothing else reads it. Where the kernels
  could not be built, linear layers stay aten.linear on the plain weights.
"""

from __future__ import annotations

import os

import torch
from torch import fx

from xllm_compiler.ops import KERNELS
from xllm_compiler.ops.native import native_cpu_kernels, native_kernels
from xllm_compiler.runtime.platform.base import Platform

aten = torch.ops.aten
LINEAR = (aten.linear.default, aten.linear.out)
PACKED_SUFFIX = "_packed"


def lowered_targets() -> frozenset:
    """What lowered graphs may call besides allowlisted ops: our kernels (native where built, else
    composites) and the packed linear layers."""
    native = native_kernels()
    linears = [native.packed_linear_out, native.packed_linear] if native is not None else []
    return frozenset([*KERNELS.values(), *native_cpu_kernels().values(), *linears])


def packable_dtypes() -> set[torch.dtype]:
    native = native_kernels()
    return {getattr(torch, name) for name in native.packed_linear_dtypes()} if native is not None else set()


class CpuPlatform(Platform):
    name = "cpu"

    def is_available(self) -> bool:
        return True

    def free_memory_bytes(self) -> int:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))

    def total_memory_bytes(self) -> int:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))

    def lower(self, graphs: dict[str, fx.Graph], weights: dict[str, torch.Tensor]) -> None:
        dtypes = packable_dtypes()
        kernels = {**KERNELS, **native_cpu_kernels()}
        for graph in graphs.values():
            for node in list(graph.nodes):
                if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                    continue
                if node.target.namespace == "xllm" and node.target.name() in kernels:
                    node.target = kernels[node.target.name()]
                elif node.target in LINEAR and _is_stored(node.args[1], weights, dtypes):
                    _use_packed_linear(graph, node, weights)
                elif node.target is aten.embedding.out and _is_token_list(node.args[1]):
                    # ATen's embedding.out gathers into a new tensor, then copies; index_select.out
                    # gathers straight into the planned buffer (the same rows: padding_idx only
                    # matters to the gradient).
                    node.target, node.args = aten.index_select.out, (node.args[0], 0, node.args[1])
            for node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
                graph.erase_node(node)  # the plain weight of a now-packed linear
        used = {n.target for g in graphs.values() for n in g.nodes if n.op == "get_attr"}
        for name in [name for name in weights if name not in used]:
            del weights[name]
        # The loaded weights are views of the file's memory map, whose touched pages count as resident
        # for as long as any view lives: own the few left unpacked (embedding, norms) so it closes.
        for name in weights:
            if not name.endswith(PACKED_SUFFIX):
                weights[name] = weights[name].clone()


def _is_stored(weight: object, weights: dict[str, torch.Tensor], dtypes: set[torch.dtype]) -> bool:
    return isinstance(weight, fx.Node) and weight.op == "get_attr" and weights[weight.target].dtype in dtypes


def _is_token_list(indices: object) -> bool:
    """A 1-d index tensor (index_select's contract), by the shape the artifact recorded for it."""
    meta = indices.meta.get("xllm_meta") if isinstance(indices, fx.Node) else None
    return isinstance(meta, dict) and len(meta.get("shape") or ()) == 1


def _use_packed_linear(graph: fx.Graph, node: fx.Node, weights: dict[str, torch.Tensor]) -> None:
    native = native_kernels()
    weight = node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    packed = weight.target + PACKED_SUFFIX
    if packed not in weights:
        weights[packed] = native.pack_linear_weight(weights[weight.target])
    with graph.inserting_before(node):
        packed_node = graph.get_attr(packed)
    if "out" in node.kwargs:
        node.target, node.args = native.packed_linear_out, (node.args[0], packed_node, bias, node.kwargs["out"])
    else:
        out_features = weights[weight.target].shape[0]
        node.target, node.args = native.packed_linear, (node.args[0], packed_node, bias, out_features)
    node.kwargs = {}
