"""``xllm-compile MODEL_DIR OUT_DIR [options]``: compile a checkpoint into an artifact."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from xllm_compiler.console import EXIT_OK, OneLineParser, RichStageListener, guarded
from xllm_compiler.options import DEFAULT_MICRO_BATCH_MIN_TOKENS, DEVICE_CHOICES, DTYPE_CHOICES


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="xllm-compile",
        description="Compile a Hugging Face decoder checkpoint (config.json + safetensors) into an artifact.",
    )
    parser.add_argument("model_dir", help="checkpoint folder: config.json, *.safetensors, optional tokenizer.json")
    parser.add_argument("out_dir", help="artifact folder to create (refused if it exists and is not empty)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="weights/activations dtype")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="target device")
    parser.add_argument("--decode-buckets", metavar="B,B,...", help="decode batch sizes (default 1,2,4,8)")
    parser.add_argument("--prefill-buckets", metavar="T,T,...", help="prefill token counts (default 32,64,128,256,512)")
    parser.add_argument("--max-seq-len", type=int, metavar="N", help="longest prompt + generation")
    parser.add_argument("--block-size", type=int, default=16, metavar="N", help="tokens per KV-cache block")
    parser.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel degree (run with torchrun)")
    parser.add_argument(
        "--micro-batch-min-tokens",
        type=int,
        default=DEFAULT_MICRO_BATCH_MIN_TOKENS,
        metavar="N",
        help="--tp: steps of at least N tokens run as two overlapped micro-batches (default %(default)s)",
    )
    parser.add_argument("--passes", metavar="P,P,...|none", help="run only these passes (pipeline order)")
    parser.add_argument("--disable-pass", action="append", default=[], metavar="NAME", help="skip a pass")
    parser.add_argument("--verify", action="store_true", help="check every pass's numerics on sample inputs")
    parser.add_argument("--buckets-from", metavar="TRACE.jsonl", help="choose buckets that fit this trace of steps")
    parser.add_argument("--num-buckets", type=int, metavar="K", help="with --buckets-from: buckets per phase")
    parser.add_argument("--cache-dir", metavar="DIR", help="compile cache (default ~/.cache/xllm_compiler)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor fill the compile cache")
    parser.add_argument("--debug-dump", metavar="DIR", help="write the graph before and after every pass to DIR")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress or summary")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def summary_table(report: dict) -> Table:
    table = Table(title="xllm-compile", show_header=True, header_style="bold")
    table.add_column("stage / pass")
    table.add_column("seconds", justify="right")
    table.add_column("nodes", justify="right")
    table.add_column("matches", justify="right")
    for stage in report["stages"]:
        table.add_row(stage["name"], f"{stage['seconds']:.3f}", "", "")
        if stage["name"] == "passes":
            for p in report["passes"]:
                table.add_row(
                    f"  {p['name']} v{p['version']}",
                    f"{p['seconds']:.3f}",
                    f"{p['nodes_before']} -> {p['nodes_after']}",
                    str(p["matches"]),
                )
    graph = report["graph"]
    buckets = sum(len(phase["buckets"]) for phase in report["buckets"].values())
    cached = " (from the compile cache)" if report["cache"]["hit"] else ""
    table.caption = (
        f"{report['model']['architecture']}, {report['model']['parameters']:,} parameters, "
        f"{report['model']['dtype']}; nodes {graph['nodes_captured']} -> {graph['nodes_after_passes']}; "
        f"{buckets} buckets; {report['total_seconds']:.2f} s{cached}"
    )
    for phase, entry in report["buckets"].items():
        if "trace" in entry:
            trace = entry["trace"]
            table.caption += (
                f"\n{phase} buckets {[b['num_tokens'] for b in entry['buckets']]}: expected padding "
                f"{trace['padding_fraction']:.1%} of the trace's tokens (default series {trace['default_series']}: "
                f"{trace['default_padding_fraction']:.1%})"
            )
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from xllm_compiler.compiler import compile_model
        from xllm_compiler.options import make_options

        options = make_options(
            dtype=args.dtype,
            device=args.device,
            decode_buckets=args.decode_buckets,
            prefill_buckets=args.prefill_buckets,
            max_seq_len=args.max_seq_len,
            block_size=args.block_size,
            tp=args.tp,
            micro_batch_min_tokens=args.micro_batch_min_tokens,
            passes=args.passes,
            disable_passes=tuple(args.disable_pass),
            verify=args.verify,
            debug_dump=args.debug_dump,
            buckets_from=args.buckets_from,
            num_buckets=args.num_buckets,
            cache_dir="" if args.no_cache else args.cache_dir,
            force=args.force,
        )
        if args.quiet:
            compile_model(args.model_dir, args.out_dir, options)
            return EXIT_OK
        console = Console(stderr=True)
        with RichStageListener(console) as listener:
            report = compile_model(args.model_dir, args.out_dir, options, listener=listener)
        Console().print(summary_table(report))
        Console().print(f"artifact written to {args.out_dir}")
        return EXIT_OK

    return guarded("xllm-compile", body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
