"""plan_memory per platform: ``PlanMemoryOptions.out_forms`` (the target's lowering table) says which ``xllm::``
ops become their ``*_out`` form; the others stay functional and unplanned, ATen's out= rewrites are the same,
and the option is part of the pass's identity (so of the compile cache key)."""

from __future__ import annotations

import pytest
import torch

from tests.passes.graphs import copy_graph_module
from tests.passes.memory import tiny_config_buckets
from xllm_compiler.ops import OUT_FORMS
from xllm_compiler.passes.memory.plan_memory import PlanMemory, PlanMemoryOptions, plan_memory
from xllm_compiler.testing import op_counts

xllm = torch.ops.xllm
OUT_OPS = {getattr(xllm, out.split("::")[1]).default for out, _ in OUT_FORMS.values()}


def _planned(out_forms: tuple[str, ...]):
    entry = tiny_config_buckets("LlamaForCausalLM").buckets[0]
    gm = copy_graph_module(entry.specialised)
    PlanMemory(PlanMemoryOptions(out_forms=out_forms))(gm)
    return entry, gm


def _aten_out_nodes(gm) -> int:
    """Nodes switched to an ATen out= overload."""
    writing = [n for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload) and "out" in n.kwargs]
    return sum(1 for n in writing if n.target.namespace == "aten")


@pytest.mark.parametrize("out_forms", [(), ("xllm::paged_attention",)], ids=["none", "attention-only"])
def test_only_the_listed_out_forms_are_used(out_forms):
    entry, gm = _planned(out_forms)
    counts = op_counts(gm)
    allowed = {getattr(xllm, OUT_FORMS[op][0].split("::")[1]).default for op in out_forms}
    assert {op for op in OUT_OPS if counts[op]} == allowed
    assert counts[xllm.rms_norm.default] + counts[xllm.fused_add_rms_norm.default] > 0  # left functional
    plan, everything = gm.meta["memory_plan"], entry.plan
    assert _aten_out_nodes(gm) == _aten_out_nodes(entry.planned)
    assert plan.unplanned_nodes > everything.unplanned_nodes
    assert plan.planned_nodes + plan.unplanned_nodes == everything.planned_nodes + everything.unplanned_nodes


def test_the_default_plans_every_out_form():
    assert PlanMemoryOptions().out_forms == tuple(sorted(OUT_FORMS))
    assert PlanMemory().identity() == plan_memory.identity()
    assert PlanMemory(PlanMemoryOptions(out_forms=())).identity() != plan_memory.identity()
