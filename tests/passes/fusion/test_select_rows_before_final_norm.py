"""select_rows_before_final_norm: the final norm runs on the rows that reach the LM head only."""

from __future__ import annotations

import operator

import pytest
import torch

from tests.passes.graphs import ARCHITECTURES, DEPTHS, aten, xllm
from xllm_compiler.passes.fusion.select_rows_before_final_norm import select_rows_before_final_norm
from xllm_compiler.testing import assert_close, check_meta, check_pass, cleanup, code, run, trace

FUSED = xllm.fused_add_rms_norm.default


@pytest.mark.parametrize("num_layers", DEPTHS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_selects_the_logits_rows_before_the_final_norm(architecture, num_layers):
    # index_select: the rotary tables' cos and sin rows, the logits rows; after: x and residual rows instead.
    (check,) = check_pass(
        select_rows_before_final_norm,
        architecture,
        1,
        num_layers=num_layers,
        ops_before={aten.index_select.default: 3, FUSED: 2 * num_layers},
        ops_after={aten.index_select.default: 4, FUSED: 2 * num_layers},
        dtypes=(torch.float32,),
    )
    final = [n for n in check.graph.graph.nodes if n.target is FUSED][-1]
    assert all(arg.target is aten.index_select.default for arg in final.args[:2])
    lm_head = next(iter(next(iter(final.users)).users))
    assert lm_head.target is aten.linear.default, "the norm's rows go straight to the LM head"


def final_norm(weight, select_sum=False):
    def fn(x, residual, rows):
        fused = FUSED(x, residual, weight, 1e-6)
        normed = operator.getitem(fused, 0).index_select(0, rows)
        return (normed, operator.getitem(fused, 1)) if select_sum else normed

    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalises_the_selected_rows_only(dtype):
    weight = torch.randn(16, dtype=dtype)
    inputs = (torch.randn(7, 16, dtype=dtype), torch.randn(7, 16, dtype=dtype), torch.tensor([2, 6]))
    gm = cleanup(trace(final_norm(weight), *inputs, weights={"norm.weight": weight}))
    expected = run(gm, *inputs)

    assert select_rows_before_final_norm(gm).matches == 1

    (fused,) = [n for n in gm.graph.nodes if n.target is FUSED]
    assert [arg.meta["val"].shape[0] for arg in fused.args[:2]] == [2, 2], "two rows normalised, not seven"
    assert_close(run(gm, *inputs), expected, dtype)
    check_meta(gm, *inputs)


def test_declines_when_the_sum_is_used():
    # The residual sum of every row is still needed: selecting rows before the op would lose it.
    weight = torch.randn(16)
    inputs = (torch.randn(7, 16), torch.randn(7, 16), torch.tensor([2, 6]))
    gm = cleanup(trace(final_norm(weight, select_sum=True), *inputs, weights={"norm.weight": weight}))
    before = code(gm)

    assert select_rows_before_final_norm(gm).matches == 0
    assert code(gm) == before
