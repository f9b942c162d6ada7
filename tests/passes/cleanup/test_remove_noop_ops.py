"""remove_noop_ops: casts to the same dtype, same-shape views and full slices go; real ones stay."""

from __future__ import annotations

import pytest
import torch

from tests.passes.graphs import aten
from xllm_compiler.passes.cleanup.remove_noop_ops import remove_noop_ops
from xllm_compiler.testing import assert_close, code, count, run, trace


def _remove(fn, *inputs):
    gm = trace(fn, *inputs)
    expected = run(gm, *inputs)
    result = remove_noop_ops(gm)
    gm.graph.lint()
    outputs = run(gm, *inputs)
    assert_close(outputs, expected, inputs[0].dtype)
    return gm, result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_removes_a_cast_to_the_same_dtype_and_keeps_a_real_cast(dtype):
    other = torch.bfloat16 if dtype == torch.float32 else torch.float32
    gm, result = _remove(lambda x: (x.to(dtype) * 2, x.to(other) * 2), torch.randn(4, 8, dtype=dtype))

    assert result.matches == 1
    [cast] = [n for n in gm.graph.nodes if n.target is aten.to.dtype]
    assert cast.args[1] == other


def test_keeps_a_cast_that_asks_for_a_copy():
    gm, result = _remove(lambda x: x.to(torch.float32, copy=True), torch.randn(4, 8))
    assert result.matches == 0 and not result
    assert count(gm, aten.to.dtype) == 1


def test_removes_same_shape_views_and_keeps_real_ones():
    def fn(x):
        same = x.view(-1, 8) + x.reshape(-1, 8) + x.expand(-1, 8)
        return same, x.view(-1, 2, 4), x.reshape(8, -1), x.expand(2, -1, -1)

    gm, result = _remove(fn, torch.randn(4, 8))

    assert result.matches == 3
    assert count(gm, aten.view.default) == count(gm, aten.reshape.default) == count(gm, aten.expand.default) == 1


def test_removes_full_slices_and_aliases_and_keeps_partial_slices():
    def fn(x):
        return x[:, :] * 2, torch.ops.aten.alias(x) * 3, x[1:] * 4, x[:, :3] * 5

    gm, result = _remove(fn, torch.randn(4, 8))

    assert count(gm, aten.alias.default) == 0
    sliced = [n for n in gm.graph.nodes if n.target is aten.slice.Tensor]
    assert [(n.args[1], n.args[2]) for n in sliced] == [(0, 1), (1, 0)]
    # x[:, :] is two full slices, then the alias, and x[:, :3] records a full slice of dim 0 first.
    assert result.matches == 2 + 1 + 1


def test_a_graph_without_noops_is_untouched():
    gm = trace(lambda x: (x.view(-1, 2, 4) * 2).to(torch.bfloat16), torch.randn(4, 8))
    before = code(gm)
    result = remove_noop_ops(gm)
    assert not result and result.matches == 0
    assert code(gm) == before
