"""The linear layers alone: our packed kernel against oneDNN's packed linear and aten.linear, per row count.

    python tools/bench_linear.py [--rows 1,2,8,32,512] [--dtype float32|bfloat16|both] [--repeats N]

Runs the 49 linear layers of the ~100M Llama (12 x [qkv 1024x768, o 768x768, gate_up 4096x768,
down 768x2048] + lm_head 32000x768), each with its own random weight, one after the other, as a decode
or prefill step does: 391 MB of float32 or 195 MB of bfloat16 weights, far more than the caches hold, so
every call streams its weight from memory. Prints the median time of the whole pass per system and the
weight bytes read per second. Ours writes into a preallocated output, as the runtime does.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import median_ms

from xllm_compiler.ops.native import native_kernels

LAYER = [(1024, 768), (768, 768), (4096, 768), (768, 2048)]
LM_HEAD = (32000, 768)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,8,32,512", help="comma-separated row counts (tokens of a step)")
    parser.add_argument("--dtype", default="both", choices=["float32", "bfloat16", "both"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    native = native_kernels()
    if native is None:
        raise SystemExit("bench_linear: the native kernels could not be built here")
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads; median of {args.repeats}; GB/s = weight bytes read per second")
    for name in dtypes:
        if name not in native.packed_linear_dtypes():
            print(f"{name}: no packed kernel on this CPU")
            continue
        dtype = getattr(torch, name)
        shapes = [*LAYER * 12, LM_HEAD]
        weights = [torch.randn(n, k, dtype=dtype) for n, k in shapes]
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        ours = [native.pack_linear_weight(w) for w in weights]
        onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
        for rows in [int(r) for r in args.rows.split(",")]:
            inputs = [torch.randn(rows, w.shape[1], dtype=dtype) for w in weights]
            outs = [torch.empty(rows, w.shape[0], dtype=dtype) for w in weights]
            systems = {
                "ours": functools.partial(run_ours, native, inputs, ours, outs),
                "oneDNN packed": functools.partial(run_onednn, inputs, onednn),
                "aten.linear": functools.partial(run_aten, inputs, weights),
            }
            repeats = max(3, args.repeats // 3) if rows >= 256 else args.repeats
            cells = []
            for system, run in systems.items():
                run()  # warm-up
                seconds = median_ms(run, repeats) / 1e3
                cells.append(f"{system} {seconds * 1e3:7.2f} ms ({nbytes / seconds / 1e9:4.1f} GB/s)")
            print(f"{name:8} rows {rows:4}: " + " | ".join(cells))


def run_ours(native, inputs, packed, outs) -> None:
    for x, weight, out in zip(inputs, packed, outs, strict=True):
        native.packed_linear_out(x, weight, None, out)


def run_onednn(inputs, packed) -> None:
    for x, weight in zip(inputs, packed, strict=True):
        torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def run_aten(inputs, weights) -> None:
    for x, weight in zip(inputs, weights, strict=True):
        torch.nn.functional.linear(x, weight)


if __name__ == "__main__":
    main()
