"""The MoE layers alone: the CPU's fused op on packed experts against the reference experts op, per row count.

    python tools/bench_moe.py [--rows 1,8,512] [--dtype float32|bfloat16|both] [--repeats N]

Runs the 6 MoE layers of tools/bench.py's mixtral-100m (8 experts, top-2, hidden 512, intermediate 1024),
each with its own random experts and router logits, one after the other as a step does, through:

  fused (packed)   ``moe.packed_fused_moe_out``: what a compiled CPU graph calls (native routing and
                   counting, one C++ call for the experts on weights packed at load; ops/moe.py).
  reference        ``moe.fused_moe_out_kernel``: the op's torch implementation on the CPU (routing as
                   tensor ops, rows grouped by expert, ``F.linear`` per expert), what
                   ``XLLM_NATIVE_KERNELS=0`` runs.
  reference, dense ``moe.capture_safe_fused_moe_out``: every expert over every row, masked (the
                   capture-safe composite other devices run until they have a kernel).

Both count routed tokens into an ``expert_counts`` buffer as the graphs do. Each pass takes the next of 16
sets of router logits, so that it routes to other experts than the pass before (with one set, the same 12
experts of 48 would be read every time, and stay in the cache). Prints the median time of the pass per
system and, for the fused op, the bytes of the experts the routed tokens read per second (at one row the
top-2 experts of each layer: a stream of weights, as a decode step is).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import median_ms

from xllm_compiler.ops import moe
from xllm_compiler.ops.native import native_kernels

LAYERS, EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 6, 8, 2, 512, 1024
SLOT = 7  # any slot but the reserved padding one: every row is a real token
ROUTINGS = 16  # router logits a pass cycles through: a fresh choice of experts each time, as tokens make


def make_layers(dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    native = native_kernels()
    layers = []
    for _ in range(LAYERS):
        gate_up = (0.05 * torch.randn(EXPERTS, 2 * INTERMEDIATE, HIDDEN)).to(dtype)
        down = (0.05 * torch.randn(EXPERTS, HIDDEN, INTERMEDIATE)).to(dtype)
        packed = dict(gate_up=native.pack_expert_weights(gate_up), down=native.pack_expert_weights(down))
        layers.append(
            dict(gate_up=gate_up, down=down, packed=packed, counts=torch.zeros(EXPERTS + 1, dtype=torch.int64))
        )
    return layers


def run(system: str, layers, hidden, routings, out, slots) -> None:
    for layer, router in zip(layers, next(routings), strict=True):
        common = dict(top_k=TOP_K, renormalise=True, weights_in_hidden_dtype=False, out=out)
        counting = dict(expert_counts=layer["counts"], slot_mapping=slots)
        if system == "fused (packed)":
            weights = layer["packed"]
            moe.packed_fused_moe_out(
                hidden, router, weights["gate_up"], weights["down"], **common, **counting, intermediate=INTERMEDIATE
            )
        elif system == "reference":
            moe.fused_moe_out_kernel(hidden, router, layer["gate_up"], layer["down"], **common, **counting)
        else:
            moe.capture_safe_fused_moe_out(hidden, router, layer["gate_up"], layer["down"], **common, **counting)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,512")
    parser.add_argument("--dtype", default="both", choices=["float32", "bfloat16", "both"])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if native_kernels() is None:
        sys.exit("bench_moe: the native CPU kernels are not built here (the fused op's packed form needs them)")
    torch.manual_seed(0)
    shape = f"{LAYERS} layers of {EXPERTS} experts, top-{TOP_K}, hidden {HIDDEN}, intermediate {INTERMEDIATE}"
    print(f"{torch.get_num_threads()} threads, {shape}")
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    for name in dtypes:
        dtype = getattr(torch, name)
        layers = make_layers(dtype)
        expert_bytes = 3 * HIDDEN * INTERMEDIATE * dtype.itemsize  # gate, up and down of one expert
        with torch.inference_mode():
            for rows in [int(r) for r in args.rows.split(",")]:
                hidden = torch.randn(rows, HIDDEN).to(dtype)
                routings = [[torch.randn(rows, EXPERTS).to(dtype) for _ in range(LAYERS)] for _ in range(ROUTINGS)]
                out, slots = torch.empty(rows, HIDDEN, dtype=dtype), torch.full((rows,), SLOT)
                # experts a pass reads, on average over the routings
                routed = sum(len(torch.topk(r.float(), TOP_K).indices.unique()) for c in routings for r in c) / ROUTINGS
                systems = ["fused (packed)", "reference"] + (["reference, dense"] if rows <= 64 else [])
                repeats = max(3, args.repeats // 6) if rows >= 256 else args.repeats
                times = {}
                for system in systems:
                    step = functools.partial(run, system, layers, hidden, itertools.cycle(routings), out, slots)
                    step()  # warm-up
                    times[system] = median_ms(step, repeats)
                fused = times["fused (packed)"]
                cells = [f"{s} {t:7.2f} ms ({t / fused:4.1f}x)" for s, t in times.items()]
                rate = routed * expert_bytes / (fused / 1e3) / 1e9
                print(f"{name:8} rows {rows:4}: " + " | ".join(cells) + f" | fused reads {rate:4.1f} GB/s of experts")


if __name__ == "__main__":
    main()
