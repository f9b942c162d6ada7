"""What loading an artifact costs: its size on disk, load() seconds, and the process's peak RSS over that size.

    python tools/measure_load.py ARTIFACT [--device cpu] [--kv-blocks N] [--json]

Run it in a fresh process per measurement: the peak resident set (``ru_maxrss``) is the whole process's,
torch's import included, so it is reported beside the resident set just before load() (``baseline``).
``ratio`` is the peak over the artifact's size; ``added ratio`` leaves the baseline out. The KV pool is
allocated lazily (blocks are zeroed on first use), so an idle pool adds nothing to either. Seconds depend
on the page cache (a file read just now loads faster than a cold one) and on what else the machine runs;
the resident sizes do not.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import xllm_compiler


def _rss_bytes() -> int:
    """The resident set now (Linux: /proc/self/statm), 0 where unknown."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(artifact: Path, device: str | None, kv_blocks: int | None) -> dict[str, float]:
    size = sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file())
    baseline = _rss_bytes()
    start = time.perf_counter()
    model = xllm_compiler.load(artifact, device=device, kv_blocks=kv_blocks)
    seconds = time.perf_counter() - start
    peak, after = _peak_rss_bytes(), _rss_bytes()
    del model
    return {
        "artifact_bytes": size,
        "load_seconds": round(seconds, 3),
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "rss_after_load_bytes": after,
        "ratio": round(peak / size, 3),
        "added_ratio": round((peak - baseline) / size, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--device", default=None, help="as load()'s device (default: the compiled one)")
    parser.add_argument("--kv-blocks", type=int, default=None, help="as load()'s kv_blocks")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args()
    if not (args.artifact / "manifest.json").is_file():
        sys.exit(f"measure_load: {args.artifact} is not an artifact (no manifest.json)")
    row = measure(args.artifact, args.device, args.kv_blocks)
    if args.json:
        print(json.dumps(row))
        return
    gib = 2**30
    print(f"artifact        {row['artifact_bytes'] / gib:.2f} GiB  ({args.artifact})")
    print(f"load            {row['load_seconds']:.2f} s")
    print(f"rss before load {row['baseline_rss_bytes'] / gib:.2f} GiB")
    after = row["rss_after_load_bytes"] / gib
    print(f"peak rss        {row['peak_rss_bytes'] / gib:.2f} GiB  (after load: {after:.2f})")
    print(f"ratio           {row['ratio']:.2f} x the artifact  ({row['added_ratio']:.2f} x without the baseline)")


if __name__ == "__main__":
    main()
