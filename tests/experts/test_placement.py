"""The expert placement planners: every plan is valid (each rank's slots full, every expert placed, every
column served by a slot holding its expert, exactly one rank serving it), and the refined planner never
leaves the most loaded rank heavier than the greedy baseline does."""

from __future__ import annotations

import random

import pytest

from xllm_compiler.errors import OptionsError
from xllm_compiler.experts.placement import PLANNERS, LayerPlan, contiguous, plan_placement


def zipf_load(num_experts: int, seed: int, exponent: float = 1.2) -> list[float]:
    popularity = [1000 / (i + 1) ** exponent for i in range(num_experts)]
    random.Random(seed).shuffle(popularity)
    return popularity


def check_valid(plan: LayerPlan, num_experts: int, ranks: int, redundant: int) -> None:
    size = (num_experts + redundant) // ranks
    assert [len(s) for s in plan.slots] == [size] * ranks
    assert {e for s in plan.slots for e in s} == set(range(num_experts))
    assert len({len(c) for c in plan.columns}) == 1  # one column count per layer
    for expert, columns in enumerate(plan.columns):
        for slot in columns:
            assert plan.slots[slot // size][slot % size] == expert
    tables = [plan.table(rank) for rank in range(ranks)]
    for entry in range(len(tables[0])):
        assert sum(t[entry] >= 0 for t in tables) == 1


CASES = [(8, 2, 0), (8, 2, 2), (8, 4, 4), (16, 4, 4), (64, 4, 8), (64, 8, 16)]


@pytest.mark.parametrize("planner", sorted(PLANNERS))
@pytest.mark.parametrize("num_experts, ranks, redundant", CASES)
def test_plans_are_valid(planner, num_experts, ranks, redundant):
    for seed in range(3):
        check_valid(PLANNERS[planner](zipf_load(num_experts, seed), ranks, redundant), num_experts, ranks, redundant)


@pytest.mark.parametrize("num_experts, ranks, redundant", CASES)
def test_refined_is_never_worse_than_greedy(num_experts, ranks, redundant):
    for seed in range(5):
        load = zipf_load(num_experts, seed)
        greedy = max(PLANNERS["greedy"](load, ranks, redundant).rank_loads(load))
        refined = max(PLANNERS["refined"](load, ranks, redundant).rank_loads(load))
        assert refined <= greedy + 1e-9
        assert refined <= max(contiguous(num_experts, ranks).rank_loads(load)) + 1e-9


def test_contiguous_plan_is_the_layout_without_placement():
    plan = contiguous(8, 2)
    assert plan.slots == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert plan.table(1) == [-1, -1, -1, -1, 0, 1, 2, 3]


def test_uniform_load_needs_no_replica_to_balance():
    plan = plan_placement([[10] * 8], ranks=2, redundant=0).layers[0]
    assert plan.rank_loads([10] * 8) == [40.0, 40.0]


def test_hot_expert_is_replicated_on_another_rank():
    load = [100, 1, 1, 1, 1, 1, 1, 1]
    plan = plan_placement([load], ranks=2, redundant=2).layers[0]
    assert all(0 in rank for rank in plan.slots)
    assert max(plan.rank_loads(load)) < 100  # the hot expert's tokens split over its replicas


@pytest.mark.parametrize(
    "redundant, fragment", [(3, "11 slots do not divide over --ep 2"), (-1, "must not be negative")]
)
def test_refuses_slots_that_do_not_divide(redundant, fragment):
    with pytest.raises(OptionsError, match=fragment):
        plan_placement([[1] * 8], ranks=2, redundant=redundant)
