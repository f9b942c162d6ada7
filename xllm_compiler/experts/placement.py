"""Expert placement (EPLB): physical expert slots planned from measured load, pure Python.

Each MoE layer has E logical experts and, under ``--ep N`` with ``--redundant-experts K``, E + K physical
slots, (E + K) / N per rank. A plan says which logical expert each slot holds and how a logical expert's
tokens split over its replicas: each expert has ``columns`` (the same number for every expert of the
layer); a token takes column ``slot_mapping % columns`` (ops/moe.py: a token's KV slot, which moves with
its position, so even a single sequence's decode steps spread over the replicas), and every column
names the replica that serves it. A replica's expected share of its expert's load is its columns over
``columns``.

Two planners, so that the second can be measured against the first (tools/eplb_sim.py):

- ``greedy``, the baseline of DeepSeek's EPLB (and xLLM's): give each of the K extra slots to the expert
  with the highest load per replica, spread each expert's columns round-robin over its replicas, then
  pack replicas heaviest first onto the least loaded rank that has a free slot (and no replica of the
  same expert, where one exists).
- ``refined`` (the default): a local search on the most loaded rank, from the greedy plan and from the
  same packing with columns = the least common multiple of the replica counts (capped; round-robin then
  splits evenly): swap one of its replicas with a lighter one of another rank, or hand one column of
  an expert replicated elsewhere to that other replica, whichever lowers the maximum most, until
  neither does; the better of the two results. Never worse than greedy by construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from xllm_compiler.errors import OptionsError
from xllm_compiler.experts.stats import read_stats

#: At most this many columns per expert: the per-rank routing table is E x columns int64 per layer.
MAX_COLUMNS = 16


@dataclass(frozen=True)
class LayerPlan:
    """One MoE layer's placement."""

    slots: list[list[int]]
    """Per rank, the logical expert held in each of its physical slots."""
    columns: list[list[int]]
    """Per logical expert, for each column, the global physical slot (rank * slots_per_rank + slot) serving it."""

    @property
    def slots_per_rank(self) -> int:
        return len(self.slots[0])

    def rank_loads(self, load: Sequence[float]) -> list[float]:
        """Expected load of each rank for per-expert ``load``."""
        per_rank = [0.0] * len(self.slots)
        for expert, columns in enumerate(self.columns):
            for slot in columns:
                per_rank[slot // self.slots_per_rank] += load[expert] / len(columns)
        return per_rank

    def table(self, rank: int) -> list[int]:
        """The routing table of ``rank`` (ops/moe.py): for expert e and column j, at e * columns + j, the
        local slot serving it on this rank, or -1."""
        size = self.slots_per_rank
        return [slot - rank * size if slot // size == rank else -1 for columns in self.columns for slot in columns]


@dataclass(frozen=True)
class Placement:
    """The plan of every MoE layer, for ``ranks`` ranks."""

    ranks: int
    layers: list[LayerPlan]

    def to_json(self) -> dict:
        return {"ranks": self.ranks, "layers": [{"slots": p.slots, "columns": p.columns} for p in self.layers]}


def contiguous(num_experts: int, ranks: int) -> LayerPlan:
    """The plan without balancing: rank r holds experts [r E/N, (r+1) E/N), one replica each."""
    size = num_experts // ranks
    return LayerPlan([list(range(r * size, (r + 1) * size)) for r in range(ranks)], [[e] for e in range(num_experts)])


def _replica_counts(load: Sequence[float], extra: int) -> list[int]:
    counts = [1] * len(load)
    for _ in range(extra):
        hottest = max(range(len(load)), key=lambda e: (load[e] / counts[e], -e))
        counts[hottest] += 1
    return counts


def _pack(load: Sequence[float], counts: list[int], columns: int, ranks: int) -> LayerPlan:
    """Round-robin columns over replicas, then heaviest replica first onto the least loaded rank with room."""
    size = sum(counts) // ranks
    replicas = []  # (weight, expert, replica index, its columns)
    for expert, count in enumerate(counts):
        for i in range(count):
            mine = [j for j in range(columns) if j % count == i]
            replicas.append((load[expert] * len(mine) / columns, expert, i, mine))
    replicas.sort(key=lambda r: (-r[0], r[1], r[2]))
    slots: list[list[int]] = [[] for _ in range(ranks)]
    loads = [0.0] * ranks
    expert_columns: list[list[int]] = [[0] * columns for _ in counts]
    for weight, expert, _, mine in replicas:
        room = [r for r in range(ranks) if len(slots[r]) < size]
        apart = [r for r in room if expert not in slots[r]] or room
        rank = min(apart, key=lambda r: (loads[r], r))
        for j in mine:
            expert_columns[expert][j] = rank * size + len(slots[rank])
        slots[rank].append(expert)
        loads[rank] += weight
    return LayerPlan(slots, expert_columns)


def greedy(load: Sequence[float], ranks: int, extra: int) -> LayerPlan:
    """DeepSeek's EPLB baseline: replicate the hottest, columns = the most replicas, pack greedily."""
    counts = _replica_counts(load, extra)
    return _pack(load, counts, max(counts), ranks)


def refined(load: Sequence[float], ranks: int, extra: int) -> LayerPlan:
    """Local search (module docstring) from the greedy plan and from the greedy packing with evenly
    splitting columns; the better of the two, so never worse than ``greedy``."""
    counts = _replica_counts(load, extra)
    even = math.lcm(*counts)
    starts = [_pack(load, counts, max(counts), ranks)]
    if max(counts) < even <= MAX_COLUMNS:
        starts.append(_pack(load, counts, even, ranks))
    return min((_improve(load, plan) for plan in starts), key=lambda plan: max(plan.rank_loads(load)))


def _improve(load: Sequence[float], plan: LayerPlan) -> LayerPlan:
    """Apply the best move for the most loaded rank until none lowers its load."""
    slots = [list(s) for s in plan.slots]
    expert_columns = [list(c) for c in plan.columns]
    while True:
        current = LayerPlan(slots, expert_columns)
        loads = current.rank_loads(load)
        top = max(range(len(slots)), key=lambda r: loads[r])
        best = _best_move(load, slots, expert_columns, loads, top, len(slots[0]))
        if best is None:
            return current
        best()


def _best_move(load, slots, expert_columns, loads, top, size):
    """The move that lowers the maximum rank load the most (None if none does): a closure applying it."""
    peak = loads[top]
    best_peak, best = peak - 1e-12 * max(peak, 1.0), None

    def slot_weight(rank: int, index: int) -> float:
        expert = slots[rank][index]
        columns = expert_columns[expert]
        return load[expert] * sum(1 for s in columns if s == rank * size + index) / len(columns)

    for other in range(len(slots)):
        if other == top:
            continue
        for i in range(size):
            wi = slot_weight(top, i)
            for j in range(size):
                if slots[other][j] in slots[top] or slots[top][i] in slots[other]:
                    continue  # keep an expert's replicas on different ranks
                wj = slot_weight(other, j)
                new_peak = max(loads[top] - wi + wj, loads[other] - wj + wi)
                others = max((loads[r] for r in range(len(slots)) if r not in (top, other)), default=0.0)
                if wj < wi and max(new_peak, others) < best_peak:
                    best_peak, best = max(new_peak, others), _swap(slots, expert_columns, size, top, i, other, j)
        for i in range(size):  # one column of top's replica to a replica of the same expert on ``other``
            expert = slots[top][i]
            columns = expert_columns[expert]
            mine = [c for c, s in enumerate(columns) if s == top * size + i]
            theirs = [other * size + j for j in range(size) if slots[other][j] == expert]
            if len(mine) < 2 or not theirs:
                continue
            share = load[expert] / len(columns)
            others = max((loads[r] for r in range(len(slots)) if r not in (top, other)), default=0.0)
            new_peak = max(loads[top] - share, loads[other] + share, others)
            if new_peak < best_peak:
                best_peak, best = new_peak, _hand_column(expert_columns, expert, mine[-1], theirs[0])
    return best


def _swap(slots, expert_columns, size, a, i, b, j):
    def apply() -> None:
        ea, eb = slots[a][i], slots[b][j]
        slots[a][i], slots[b][j] = eb, ea
        sa, sb = a * size + i, b * size + j
        expert_columns[ea] = [sb if s == sa else s for s in expert_columns[ea]]
        expert_columns[eb] = [sa if s == sb else s for s in expert_columns[eb]]

    return apply


def _hand_column(expert_columns, expert, column, slot):
    def apply() -> None:
        expert_columns[expert][column] = slot

    return apply


PLANNERS = {"greedy": greedy, "refined": refined}


def plan_placement(loads: Sequence[Sequence[float]], ranks: int, redundant: int, planner: str = "refined") -> Placement:
    """The placement of every layer (``loads``: per MoE layer, per expert) over ``ranks`` ranks with
    ``redundant`` extra slots per layer; OptionsError if the slots do not divide over the ranks."""
    num_experts = len(loads[0])
    if redundant < 0:
        raise OptionsError(f"--redundant-experts must not be negative, got {redundant}")
    if (num_experts + redundant) % ranks:
        raise OptionsError(
            f"--redundant-experts {redundant}: {num_experts} experts + {redundant} = {num_experts + redundant} "
            f"slots do not divide over --ep {ranks} ranks"
        )
    if redundant > num_experts * (ranks - 1):
        raise OptionsError(f"--redundant-experts {redundant}: more replicas than {ranks} ranks can hold apart")
    return Placement(ranks, [PLANNERS[planner](layer, ranks, redundant) for layer in loads])


def placement_from_stats(
    stats_file: str | None, redundant: int, ep: int, moe_layers: int, num_experts: int
) -> tuple[Placement, list[list[int]]] | None:
    """The plan ``--expert-placement STATS.json --redundant-experts K --ep N`` asks for, and the loads it was
    planned from; None without ``--expert-placement``. OptionsError names what does not fit."""
    if stats_file is None:
        if redundant:
            raise OptionsError(f"--redundant-experts {redundant} needs --expert-placement STATS.json")
        return None
    if ep < 2:
        raise OptionsError(f"--expert-placement {stats_file} needs --ep N with N > 1 (got --ep {ep})")
    path = Path(stats_file)
    stats = read_stats(path)
    stats.check_model(path, moe_layers, num_experts)
    return plan_placement(stats.layers, ep, redundant), stats.layers


def placement_report(placement: Placement, loads: list[list[int]]) -> dict:
    """report.json's ``experts``: the plan, and per layer each rank's expected share of the routed load
    without it (contiguous experts) and with it, with the max/mean rank load of each."""
    ranks = placement.ranks
    before = [contiguous(len(load), ranks).rank_loads(load) for load in loads]
    after = [plan.rank_loads(load) for plan, load in zip(placement.layers, loads, strict=True)]

    def shares(per_layer: list[list[float]]) -> list[list[float]]:
        return [[round(x / (sum(layer) or 1.0), 4) for x in layer] for layer in per_layer]

    def imbalance(per_layer: list[list[float]]) -> list[float]:
        return [round(max(layer) * ranks / (sum(layer) or 1.0), 4) for layer in per_layer]

    return {
        "plan": placement.to_json(),
        "load_share": {"before": shares(before), "after": shares(after)},
        "max_over_mean": {"before": imbalance(before), "after": imbalance(after)},
    }
