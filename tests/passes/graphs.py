"""Small hand-built graphs for pass tests, and a cache that makes check_pass's model graphs cheap.

``trace`` turns a function over reference ops into the ATen GraphModule a pass sees in the pipeline:
make_fx(pre_dispatch=True) with symbolic shapes, so every node carries ``meta["val"]``, and closed-over
weights as ``get_attr`` nodes with static shapes, under the names the test gives them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

import xllm_compiler.ops  # noqa: F401  (registers torch.ops.xllm)
from xllm_compiler import testing
from xllm_compiler.passes.pattern_pass import CANONICAL_CLEANUP
from xllm_compiler.passes.verify import TOLERANCE

aten, xllm = torch.ops.aten, torch.ops.xllm

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
DEPTHS = (1, 3)


def trace(
    fn: Callable[..., Any],
    *inputs: torch.Tensor,
    weights: dict[str, torch.Tensor] | None = None,
    weights_first: bool = True,
) -> fx.GraphModule:
    """``fn(*inputs)`` as an ATen GraphModule; tensors of ``weights`` that ``fn`` closes over become
    ``get_attr`` nodes named by their keys (dotted names make submodules, as in a real model), read at
    the top of the graph as capture() does, or where first used (``weights_first=False``)."""
    traced = make_fx(fn, pre_dispatch=True, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*inputs)
    names = {id(tensor): name for name, tensor in (weights or {}).items()}
    root: dict[str, torch.Tensor] = {}
    first_op = next(n for n in traced.graph.nodes if n.op != "placeholder")
    for node in list(traced.graph.nodes):
        if node.op == "get_attr":
            tensor = getattr(traced, node.target)
            node.target = names.get(id(tensor), node.target)
            root[node.target] = tensor
            if weights_first and node is not first_op:
                first_op.prepend(node)  # weights first, as in a captured model graph
    return fx.GraphModule(root, traced.graph)


def cleanup(gm: fx.GraphModule) -> fx.GraphModule:
    """The canonicalising cleanup the pipeline runs before any fusion."""
    for graph_pass in CANONICAL_CLEANUP:
        graph_pass(gm)
    return gm


def run(gm: fx.GraphModule, *inputs: torch.Tensor) -> Any:
    """The graph's outputs on ``inputs`` (cloned, so that mutating graphs leave them alone)."""
    gm.recompile()
    with torch.no_grad():
        return gm(*(x.clone() for x in inputs))


def count(gm: fx.GraphModule, target: Any) -> int:
    """How many call_function nodes call ``target``."""
    return sum(1 for node in gm.graph.nodes if node.op == "call_function" and node.target == target)


def code(gm: fx.GraphModule) -> str:
    """The graph's printed Python code, regenerated: passes edit the graph only."""
    gm.recompile()
    return gm.code


def assert_close(actual: Any, expected: Any, dtype: torch.dtype) -> None:
    """Outputs agree within the tolerance --verify uses for ``dtype``, relative to the largest value."""
    actual = actual if isinstance(actual, (list, tuple)) else [actual]
    expected = expected if isinstance(expected, (list, tuple)) else [expected]
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        scale = e.float().abs().max().clamp_min(1e-12)
        error = ((a.float() - e.float()).abs().max() / scale).item()
        assert error <= TOLERANCE[dtype], f"relative error {error:.3g} > {TOLERANCE[dtype]}"


def check_meta(gm: fx.GraphModule, *inputs: torch.Tensor) -> None:
    """Every node's ``meta["val"]`` has the rank, static sizes and dtype of the value it really computes."""

    class Checker(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            result = super().run_node(node)
            values = result if isinstance(result, (list, tuple)) else [result]
            metas = node.meta.get("val")
            metas = metas if isinstance(metas, (list, tuple)) else [metas]
            for value, meta in zip(values, metas, strict=False):
                if isinstance(value, torch.Tensor) and isinstance(meta, torch.Tensor):
                    sizes = [s if isinstance(s, int) else None for s in meta.shape]
                    assert value.dim() == len(sizes) and value.dtype == meta.dtype, (
                        f"{node.format_node()}: computes {value.dtype}{list(value.shape)}, meta says {meta}"
                    )
                    assert all(s is None or s == v for s, v in zip(sizes, value.shape, strict=True)), (
                        f"{node.format_node()}: computes {list(value.shape)}, meta says {list(meta.shape)}"
                    )
            return result

    gm.recompile()
    with torch.no_grad():
        Checker(gm).run(*(x.clone() for x in inputs))


# -- model graphs --------------------------------------------------------------------------------

_BUILT: dict[str, fx.GraphModule] = {}
_build_graph = testing.build_graph


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own graph (nodes and their meta dicts) and module tree, sharing the weight
    tensors and fake values, which passes replace but never modify."""
    copied = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    copied.meta = dict(gm.meta)
    return copied


def cached_build_graph(config: dict[str, Any], dtype: torch.dtype = torch.float32, seed: int = 0) -> fx.GraphModule:
    """testing.build_graph, memoised: torch.export of a model is most of check_pass's time, and a test
    module asks for the same few (architecture, depth, dtype) graphs over and over."""
    key = json.dumps([config, str(dtype), seed], sort_keys=True)
    if key not in _BUILT:
        _BUILT[key] = _build_graph(config, dtype, seed)
    return copy_graph_module(_BUILT[key])


def model_graph(architecture: str, num_layers: int, dtype: torch.dtype = torch.float32) -> fx.GraphModule:
    """A fresh copy of the traced tiny random model check_pass uses."""
    return cached_build_graph(testing.tiny_config(architecture, num_hidden_layers=num_layers), dtype)
