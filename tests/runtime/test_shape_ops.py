"""runtime/platform/shape_ops.py: shape-only ATen calls of a lowered CPU graph retargeted to Tensor methods,
with the same results; calls with keyword arguments keep their op."""

from __future__ import annotations

import torch
from torch import fx

from xllm_compiler.runtime.platform.shape_ops import TENSOR_METHODS, use_tensor_methods

aten = torch.ops.aten


def shape_graph() -> fx.Graph:
    graph = fx.Graph()
    x = graph.placeholder("x")
    merged = graph.call_function(aten.view.default, (x, [-1, 96]))
    parts = graph.call_function(aten.split_with_sizes.default, (merged, [64, 16, 16], -1))
    query = graph.call_function(aten.reshape.default, (graph.call_function(lambda p: p[0], (parts,)), [-1, 4, 16]))
    key = graph.call_function(aten.unsqueeze.default, (graph.call_function(lambda p: p[1], (parts,)), 0))
    value = graph.call_function(aten.unsqueeze.default, (graph.call_function(lambda p: p[2], (parts,)),), {"dim": 1})
    graph.output((query, key, value))
    return graph


def test_shape_ops_become_tensor_methods_with_equal_results():
    x = torch.randn(3, 2, 48)
    before = fx.GraphModule(torch.nn.Module(), shape_graph())(x)
    graph = shape_graph()
    assert use_tensor_methods(graph) == 4  # view, split, reshape, one unsqueeze; the keyword call stays
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert sum(t in TENSOR_METHODS.values() for t in targets) == 4 and aten.unsqueeze.default in targets
    after = fx.GraphModule(torch.nn.Module(), graph)(x)
    for got, want in zip(after, before, strict=True):
        assert got.shape == want.shape and torch.equal(got, want)
        assert got.data_ptr() == want.data_ptr()  # views of x, both
