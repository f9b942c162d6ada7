"""Expert placement on a skewed synthetic routing trace: max/mean rank load without a plan, with the
greedy baseline (DeepSeek's EPLB) and with the refined planner, at EP=2 and EP=4 (simulated ranks).

    python tools/eplb_sim.py [--experts 64] [--top-k 6] [--layers 4] [--tokens 20000] [--zipf 1.2]

Each layer's expert popularity is Zipf-distributed (a random permutation of 1/rank^s per layer); each
token picks top_k distinct experts with those probabilities. The plan is made from one trace (what
``xllm-run --expert-stats`` would measure) and scored on a second, held-out trace drawn from the same
popularity, with the runtime's routing rule: a token takes column ``slot % columns`` of its expert (here
the token's index stands for its KV slot). max/mean is the most loaded rank's tokens over the mean
rank's, averaged over layers: 1.0 is perfect balance, and the step time of an expert-parallel layer
follows the most loaded rank. The "planned" columns are the planners' own objective (the expected
max/mean on the measured trace), the "held out" ones what the plan achieves on new traffic.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from xllm_compiler.experts.placement import LayerPlan, contiguous, greedy, refined


def routing_trace(popularity: torch.Tensor, tokens: int, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """[tokens, top_k] expert ids, each row distinct experts drawn by ``popularity``."""
    return torch.multinomial(popularity.expand(tokens, -1), top_k, replacement=False, generator=generator)


def measured_rank_loads(plan: LayerPlan, ids: torch.Tensor) -> list[int]:
    """Tokens each rank computes for routing ``ids`` under ``plan`` (column = token index % columns)."""
    columns = len(plan.columns[0])
    slot_of = torch.tensor(plan.columns)  # [E, columns] -> global slot
    column = (torch.arange(ids.shape[0]) % columns)[:, None].expand_as(ids)
    ranks = slot_of[ids, column] // plan.slots_per_rank
    return torch.bincount(ranks.flatten(), minlength=len(plan.slots)).tolist()


def imbalance(loads: list[int] | list[float]) -> float:
    return max(loads) * len(loads) / sum(loads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=20000, help="tokens per trace (measured, then held out)")
    parser.add_argument("--zipf", type=float, default=1.2, help="popularity exponent s (0: uniform)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    layers = []
    for _ in range(args.layers):
        weights = [1 / (i + 1) ** args.zipf for i in range(args.experts)]
        rng.shuffle(weights)
        popularity = torch.tensor(weights)
        measured = routing_trace(popularity, args.tokens, args.top_k, generator)
        held_out = routing_trace(popularity, args.tokens, args.top_k, generator)
        layers.append((torch.bincount(measured.flatten(), minlength=args.experts).tolist(), held_out))

    print(f"{args.experts} experts, top-{args.top_k}, Zipf s={args.zipf}, {args.layers} layers, {args.tokens} tokens")
    print(
        f"{'EP':>3} {'K':>3} | planned: {'greedy':>7} {'refined':>7} | held out: {'no plan':>7} {'greedy':>7}"
        f" {'refined':>7} | ms/layer: {'greedy':>6} {'refined':>7}"
    )
    for ranks in (2, 4):
        for redundant in (0, ranks, 2 * ranks):
            if (args.experts + redundant) % ranks:
                continue
            scores: dict[str, list[float]] = {"none": [], "greedy": [], "refined": []}
            planned: dict[str, list[float]] = {"greedy": [], "refined": []}
            seconds = {"greedy": 0.0, "refined": 0.0}
            for load, held_out in layers:
                scores["none"].append(imbalance(measured_rank_loads(contiguous(args.experts, ranks), held_out)))
                for name, planner in (("greedy", greedy), ("refined", refined)):
                    start = time.perf_counter()
                    plan = planner(load, ranks, redundant)
                    seconds[name] += time.perf_counter() - start
                    scores[name].append(imbalance(measured_rank_loads(plan, held_out)))
                    planned[name].append(imbalance(plan.rank_loads(load)))
            mean = {name: sum(v) / len(v) for name, v in scores.items()}
            expected = {name: sum(v) / len(v) for name, v in planned.items()}
            per_layer = {name: 1000 * s / len(layers) for name, s in seconds.items()}
            print(
                f"{ranks:>3} {redundant:>3} | planned: {expected['greedy']:>7.3f} {expected['refined']:>7.3f} |"
                f" held out: {mean['none']:>7.3f} {mean['greedy']:>7.3f} {mean['refined']:>7.3f} |"
                f" ms/layer: {per_layer['greedy']:>6.2f} {per_layer['refined']:>7.2f}"
            )


if __name__ == "__main__":
    main()
