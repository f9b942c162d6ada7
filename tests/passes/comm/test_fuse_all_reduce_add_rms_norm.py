"""fuse_all_reduce_add_rms_norm: the end of a tensor-parallel sublayer (all-reduce, residual add, RMSNorm)
becomes one xllm::all_reduce_add_rms_norm, in either operand order, unless compute is in flight with
the all-reduce (a window the fusion would close)."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

from xllm_compiler.models.parallel import TRACED_GROUP
from xllm_compiler.ops import reference
from xllm_compiler.ops.collectives import all_reduce
from xllm_compiler.passes.comm.collectives import ISSUES, WAIT
from xllm_compiler.passes.comm.fuse_all_reduce_add_rms_norm import fuse_all_reduce_add_rms_norm
from xllm_compiler.passes.comm.reorder_collectives import reorder_collectives
from xllm_compiler.passes.fusion.fuse_add_rms_norm import fuse_add_rms_norm
from xllm_compiler.testing import assert_close, check_meta, cleanup, code, count, run, trace

xllm = torch.ops.xllm
FUSED = xllm.all_reduce_add_rms_norm.default
HIDDEN = 16


def sublayer_end(weights, eps, residual_first):
    """o_proj's all-reduce, the residual add and the next norm, as fuse_add_rms_norm leaves them."""

    def fn(x, residual, y):
        reduced = all_reduce(F.linear(x, weights["o_proj"]), TRACED_GROUP)
        pair = (residual, reduced) if residual_first else (reduced, residual)
        fused = xllm.fused_add_rms_norm.default(*pair, weights["norm"], eps)
        other = F.linear(y, weights["other"])  # work that does not depend on the all-reduce
        return operator.getitem(fused, 0) + other, operator.getitem(fused, 1)

    return fn


def make_inputs(dtype=torch.float32):
    weights = {name: torch.randn(HIDDEN, HIDDEN, dtype=dtype) for name in ("o_proj", "other")}
    weights["norm"] = 1.0 + 0.1 * torch.randn(HIDDEN, dtype=dtype)
    return weights, tuple(torch.randn(5, HIDDEN, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual_first", [False, True], ids=["reduced-first", "residual-first"])
def test_fuses_the_end_of_a_sublayer(residual_first, dtype):
    weights, inputs = make_inputs(dtype)
    gm = cleanup(trace(sublayer_end(weights, 1e-5, residual_first), *inputs, weights=weights))
    expected = run(gm, *inputs)

    assert fuse_all_reduce_add_rms_norm(gm).matches == 1

    (fused,) = [n for n in gm.graph.nodes if n.target is FUSED]
    assert fused.args[3:] == (1e-5, TRACED_GROUP), "eps and group carried over"
    assert count(gm, xllm.fused_add_rms_norm.default) == 0
    assert not any(n.target in ISSUES or n.target is WAIT for n in gm.graph.nodes)
    assert_close(run(gm, *inputs), expected, dtype)
    check_meta(gm, *inputs)


def test_fuses_what_fuse_add_rms_norm_leaves_of_the_reference_ops():
    weights, inputs = make_inputs()

    def fn(x, residual, y):
        summed = all_reduce(F.linear(x, weights["o_proj"]), TRACED_GROUP) + residual
        return reference.rms_norm(summed, weights["norm"], 1e-6), summed

    gm = cleanup(trace(fn, *inputs, weights=weights))
    expected = run(gm, *inputs)

    assert fuse_add_rms_norm(gm).matches == 1
    assert fuse_all_reduce_add_rms_norm(gm).matches == 1
    assert count(gm, FUSED) == 1
    assert_close(run(gm, *inputs), expected, torch.float32)


def test_declines_an_all_reduce_with_compute_in_flight():
    weights, inputs = make_inputs()

    def fn(x, residual, y):
        partial = F.linear(x, weights["o_proj"])
        other = F.linear(F.silu(F.linear(y, weights["other"])), weights["other"])
        fused = xllm.fused_add_rms_norm.default(all_reduce(partial, TRACED_GROUP), residual, weights["norm"], 1e-6)
        return operator.getitem(fused, 0) + other, operator.getitem(fused, 1)

    def graph():
        return cleanup(trace(fn, *inputs, weights=weights))

    assert fuse_all_reduce_add_rms_norm(graph()).matches == 1, "as written, nothing is in flight"
    gm = graph()
    expected = run(gm, *inputs)
    reorder_collectives(gm)  # issues the all-reduce before the other work: now it hides behind it
    before = code(gm)

    assert fuse_all_reduce_add_rms_norm(gm).matches == 0

    assert code(gm) == before
    assert_close(run(gm, *inputs), expected, torch.float32)


def test_declines_a_norm_without_an_all_reduce():
    weights, inputs = make_inputs()

    def fn(x, residual, y):
        fused = xllm.fused_add_rms_norm.default(F.linear(x, weights["o_proj"]), residual, weights["norm"], 1e-6)
        return operator.getitem(fused, 0), operator.getitem(fused, 1)

    gm = cleanup(trace(fn, *inputs, weights=weights))
    before = code(gm)
    assert fuse_all_reduce_add_rms_norm(gm).matches == 0
    assert code(gm) == before
