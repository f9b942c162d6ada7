"""KV-cache writes made functional: ONNX has no in-place mutation, so the graph must return the new cache.

Every ``xllm::`` op that writes a cache is replaced by a twin of the ``xllm_onnx`` namespace that takes the
same arguments and returns the updated cache too; the graph then returns each layer's final cache after
its own outputs. The twins' kernels run ours on a copy (so the rewritten graph still runs in torch, as
``torch.export`` needs); their ONNX forms are in translations.py.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

import xllm_compiler.ops  # noqa: F401  (registers the xllm ops the twins call)
from xllm_compiler.errors import ArtifactError, OptionsError


@torch.library.custom_op("xllm_onnx::paged_attention", mutates_args=())
def _paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """xllm::paged_attention on a copy of the cache: (attention output, updated cache)."""
    cache = kv_cache.clone()
    metadata = (slot_mapping, query_lens, seq_lens, block_tables)
    out = torch.ops.xllm.paged_attention.default(query, key, value, cache, *metadata, scale, sliding_window)
    return out, cache


@_paged_attention.register_fake
def _(query, key, value, kv_cache, slot_mapping, query_lens, seq_lens, block_tables, scale, sliding_window):
    return torch.empty_like(query), torch.empty_like(kv_cache)


@torch.library.custom_op("xllm_onnx::write_kv_cache", mutates_args=())
def _write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> torch.Tensor:
    """xllm::write_kv_cache on a copy of the cache: the updated cache."""
    cache = kv_cache.clone()
    torch.ops.xllm.write_kv_cache.default(key, value, cache, slot_mapping)
    return cache


@_write_kv_cache.register_fake
def _(key, value, kv_cache, slot_mapping):
    return torch.empty_like(kv_cache)


#: mutating op -> (functional twin, index of the cache argument, number of outputs besides the cache)
_FUNCTIONAL: dict[Any, tuple[Any, int, int]] = {
    torch.ops.xllm.paged_attention.default: (torch.ops.xllm_onnx.paged_attention.default, 3, 1),
    torch.ops.xllm.write_kv_cache.default: (torch.ops.xllm_onnx.write_kv_cache.default, 2, 0),
}
_PAGED_ATTENTION_ARGS = 10  # without token_offset, which only tensor-parallel micro-batches set


def functionalize_kv_cache(graph: fx.Graph) -> list[str]:
    """Rewrite ``graph`` so that no op mutates a KV cache: each writer becomes its functional twin
    reading the latest cache value, and the output gains the final cache of every layer (in
    placeholder order). Returns the names of those cache inputs."""
    caches = [n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("kv_cache_")]
    latest: dict[fx.Node, fx.Node] = {c: c for c in caches}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _FUNCTIONAL:
            continue
        twin, cache_index, outputs = _FUNCTIONAL[node.target]
        args = list(node.args)
        if node.target is torch.ops.xllm.paged_attention.default:
            if any(args[_PAGED_ATTENTION_ARGS:]) or node.kwargs.get("token_offset"):
                raise OptionsError(f"node {node.name}: micro-batched attention cannot be exported to ONNX")
            args = args[:_PAGED_ATTENTION_ARGS]
        cache = args[cache_index]
        if cache not in latest:
            raise ArtifactError(f"node {node.name} writes {cache}, which is no kv_cache input of the graph")
        args[cache_index] = latest[cache]
        with graph.inserting_before(node):
            call = graph.call_function(twin, tuple(args))
            if outputs:
                node.replace_all_uses_with(graph.call_function(operator.getitem, (call, 0)))
                latest[cache] = graph.call_function(operator.getitem, (call, outputs))
            else:
                latest[cache] = call
        graph.erase_node(node)
    output = next(n for n in graph.nodes if n.op == "output")
    (results,) = output.args
    output.args = ((*results, *(latest[c] for c in caches)),)
    graph.lint()
    return [c.name for c in caches]
