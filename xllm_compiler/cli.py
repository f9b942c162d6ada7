"""``xllm-compile MODEL_DIR OUT_DIR [options]``: compile a checkpoint into an artifact."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from xllm_compiler.console import EXIT_OK, OneLineParser, RichStageListener, guarded, version_string
from xllm_compiler.options import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_DECODE_BUCKETS,
    DEFAULT_GROUP_SIZE,
    DEFAULT_MICRO_BATCH_MIN_TOKENS,
    DEFAULT_PREFILL_BUCKETS,
    DEVICE_CHOICES,
    DTYPE_CHOICES,
    GROUP_SIZES,
    MAX_SEQ_LEN_CAP,
    QUANTIZE_CHOICES,
)
from xllm_compiler.sizes import format_bytes, parse_size


def _sizes(values: Iterable[int]) -> str:
    return ",".join(map(str, values))


def _pass_names() -> str:
    """Every pass a --passes or --disable-pass may name, in pipeline order (graph passes, then bucket passes)."""
    from xllm_compiler.passes import bucket_pipeline, default_pipeline

    return ", ".join(p.name for p in [*default_pipeline(), *bucket_pipeline()])


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="xllm-compile",
        description="Compile a Hugging Face decoder checkpoint (config.json + safetensors) into an artifact.",
    )
    parser.add_argument("model_dir", help="checkpoint folder: config.json, *.safetensors, optional tokenizer.json")
    parser.add_argument("out_dir", help="artifact folder to create (refused if it exists and is not empty)")
    parser.add_argument("--version", action="version", version=version_string("xllm-compile"))
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="weights/activations dtype; auto keeps the checkpoint's, float32 if it names none (default %(default)s)",
    )
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="target device (default %(default)s)")
    parser.add_argument(
        "--decode-buckets", metavar="B,B,...", help=f"decode batch sizes (default {_sizes(DEFAULT_DECODE_BUCKETS)})"
    )
    parser.add_argument(
        "--prefill-buckets",
        metavar="T,T,...",
        help=f"prefill token counts (default {_sizes(DEFAULT_PREFILL_BUCKETS)}, those above --max-seq-len dropped)",
    )
    parser.add_argument(
        "--max-seq-len",
        type=int,
        metavar="N",
        help=f"longest prompt + generation (default: the model's max_position_embeddings, capped at {MAX_SEQ_LEN_CAP})",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        metavar="N",
        help=f"tokens per KV-cache block (default {DEFAULT_BLOCK_SIZE}; on npu 128, what its paged kernels take)",
    )
    parser.add_argument(
        "--tp", type=int, default=1, metavar="N", help="tensor-parallel degree, run with torchrun (default %(default)s)"
    )
    parser.add_argument(
        "--ep",
        type=int,
        default=1,
        metavar="N",
        help="expert-parallel degree (MoE models: experts split over N ranks), run with torchrun (default %(default)s)",
    )
    parser.add_argument(
        "--expert-placement",
        metavar="STATS.json",
        help="with --ep: place experts (and replicas) to balance the load measured by xllm-run --expert-stats",
    )
    parser.add_argument(
        "--redundant-experts",
        type=int,
        default=0,
        metavar="K",
        help="with --expert-placement: K extra expert slots per MoE layer, replicas of the hottest (default 0)",
    )
    parser.add_argument(
        "--micro-batch-min-tokens",
        type=int,
        default=DEFAULT_MICRO_BATCH_MIN_TOKENS,
        metavar="N",
        help="--tp: steps of at least N tokens run as two overlapped micro-batches (default %(default)s)",
    )
    parser.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=0,
        metavar="K",
        help="compile verify buckets for speculative decoding with K proposals per sequence (default: none)",
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default="none",
        help="linear-layer weights quantized at compile time: int8 = symmetric, per output channel, float32 "
        "scales; int4 = asymmetric, per group of --group-size inputs (default %(default)s)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        choices=GROUP_SIZES,
        metavar="N",
        help=f"with --quantize int4: inputs per scale and offset, one of {_sizes(GROUP_SIZES)} "
        f"(default {DEFAULT_GROUP_SIZE}: 4.5 bits a weight)",
    )
    parser.add_argument(
        "--no-quantize-lm-head", action="store_true", help="with --quantize: keep the LM head's weight in --dtype"
    )
    parser.add_argument(
        "--passes",
        metavar="P,P,...|none",
        help=f"run only these passes, in pipeline order (default: all): {_pass_names()}",
    )
    parser.add_argument("--disable-pass", action="append", default=[], metavar="NAME", help="skip a pass (repeatable)")
    parser.add_argument("--verify", action="store_true", help="check every pass's numerics on sample inputs")
    parser.add_argument("--buckets-from", metavar="TRACE.jsonl", help="choose buckets that fit this trace of steps")
    parser.add_argument(
        "--num-buckets",
        type=int,
        metavar="K",
        help="with --buckets-from: buckets per phase (default: as many as the default series)",
    )
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="compile cache (default $XLLM_CACHE_DIR, else $XDG_CACHE_HOME/xllm_compiler, else ~/.cache/xllm_compiler)",
    )
    parser.add_argument(
        "--cache-max-size",
        metavar="SIZE",
        help="compile cache size limit, e.g. 10G; least recently used entries go first "
        "(default $XLLM_CACHE_MAX_SIZE, else 20G)",
    )
    parser.add_argument("--no-cache", action="store_true", help="neither read nor fill the compile cache")
    parser.add_argument("--debug-dump", metavar="DIR", help="write the graph before and after every pass to DIR")
    parser.add_argument(
        "--export-onnx",
        metavar="DIR",
        help="also write every bucket's graph as DIR/<bucket>.onnx (needs the onnx extra; README: ONNX export)",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress or summary")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


# -- the summary ----------------------------------------------------------------------------------


#: How a summary value that needs the user's attention begins (it is shown in yellow).
WARNING = "warning: "


def artifact_bytes(out_dir: Path) -> int:
    """The artifact's size: every file under ``out_dir``."""
    return sum(p.stat().st_size for p in Path(out_dir).rglob("*") if p.is_file())


def pass_table(report: dict[str, Any]) -> Table:
    """Time per stage, and per pass its node counts and matches."""
    table = Table(title="xllm-compile", show_header=True, header_style="bold")
    table.add_column("stage / pass", overflow="fold")
    for name in ("seconds", "nodes", "matches"):
        table.add_column(name, justify="right", no_wrap=True)
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
    return table


def summary_rows(report: dict[str, Any], out_dir: Path) -> list[tuple[str, Text]]:
    """(what, value) lines under the pass table: the model, buckets, lengths, sizes and any warning
    (in yellow). Values are Text, never markup: paths and messages may hold brackets."""
    model, graph = report["model"], report["graph"]
    tp = f", tensor-parallel {model['tensor_parallel']}" if model.get("tensor_parallel", 1) > 1 else ""
    group = f" (group {model['group_size']})" if model.get("group_size") else ""
    quantized = f", {model['quantize']}{group} weights" if model.get("quantize") else ""
    if packed := model.get("checkpoint_quantization"):
        quantized += f", {packed['bits']}-bit {packed['method'].upper()} weights in {packed['linear_layers']} layers"
    rows = [
        ("model", f"{model['architecture']}, {model['parameters']:,} parameters, {model['dtype']}{quantized}{tp}"),
        ("graph", f"{graph['nodes_captured']} -> {graph['nodes_after_passes']} nodes"),
    ]
    for phase, entry in report["buckets"].items():
        value = _sizes(b["num_tokens"] for b in entry["buckets"])
        if trace := entry.get("trace"):
            value += (
                f" (expected padding {trace['padding_fraction']:.1%} of the trace's tokens; default series "
                f"{_sizes(trace['default_series'])}: {trace['default_padding_fraction']:.1%})"
            )
        rows.append((f"{phase} buckets", value))
    if limits := report.get("limits"):
        rows.append(("max_seq_len", _max_seq_len_text(limits)))
    rows.append(("artifact", f"{format_bytes(artifact_bytes(out_dir))} on disk"))
    if memory := report.get("load_memory"):
        rows.append(("load memory", _load_memory_text(memory)))
        if expanded := memory.get("expanded_kv_bytes_per_token"):
            latent = memory["kv_bytes_per_token"]
            rows.append(
                ("kv cache", f"{latent:,} B/token latent (MLA), {expanded:,} expanded: {expanded / latent:.1f}x less")
            )
    cached = " (from the compile cache)" if report["cache"]["hit"] else ""
    rows.append(("time", f"{report['total_seconds']:.2f} s{cached}"))
    if damaged := report["cache"].get("damaged"):
        rows.append(("cache", f"{WARNING}the cached entry was damaged ({damaged}): discarded and rebuilt"))
    if tokenizer := report.get("tokenizer"):
        rows.append(("tokenizer", _tokenizer_text(tokenizer)))
    rows.extend(("warning", f"{WARNING}{warning}") for warning in report.get("warnings", []))
    return [(what, Text(value, style="yellow" if value.startswith(WARNING) else "")) for what, value in rows]


def _load_memory_text(memory: dict[str, Any]) -> str:
    """What a load of the artifact takes here (report.json's load_memory, sized as load() sizes it)."""
    fixed = f"weights {format_bytes(memory['weight_bytes'])} + arena {format_bytes(memory['arena_bytes'])}"
    if not memory["fits_this_machine"]:
        return f"{fixed}; no room for a KV pool on this machine (see the warning)"
    blocks = f"{memory['kv_blocks']} blocks, sized by {memory['kv_pool_sized_by']}"
    pool = f"KV pool {format_bytes(memory['kv_bytes'])} ({blocks})"
    return f"~{format_bytes(memory['total_bytes'])} ({fixed} + {pool})"


def _tokenizer_text(tokenizer: dict[str, Any]) -> str:
    if tokenizer["status"] == "ok":
        return f"{tokenizer['file']}, {tokenizer['vocab_size']:,} token ids"
    if tokenizer["status"] == "missing":
        return "none (the checkpoint has no tokenizer.json): run with --prompt-ids"
    return f"{WARNING}{tokenizer['problem']}; run with --prompt-ids"


def _max_seq_len_text(limits: dict[str, Any]) -> str:
    chosen, declared = limits["max_seq_len"], limits["max_position_embeddings"]
    if limits["capped"]:
        return f"{chosen} (the model declares {declared}; capped at {chosen}: pass --max-seq-len to raise it)"
    if limits.get("chosen_by") == "option":
        return f"{chosen} (--max-seq-len; the model declares {declared})"
    return f"{chosen} (the model's max_position_embeddings)"


def summary(report: dict[str, Any], out_dir: Path) -> Group:
    """The compile summary: the pass table, then one short line per fact, readable at 80 columns."""
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column(overflow="fold")
    for what, value in summary_rows(report, out_dir):
        facts.add_row(what, value)
    return Group(pass_table(report), facts)


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
            ep=args.ep,
            expert_placement=args.expert_placement,
            redundant_experts=args.redundant_experts,
            micro_batch_min_tokens=args.micro_batch_min_tokens,
            num_speculative_tokens=args.num_speculative_tokens,
            quantize=args.quantize,
            quantize_lm_head=not args.no_quantize_lm_head,
            group_size=args.group_size,
            passes=args.passes,
            disable_passes=tuple(args.disable_pass),
            verify=args.verify,
            debug_dump=args.debug_dump,
            buckets_from=args.buckets_from,
            num_buckets=args.num_buckets,
            cache_dir="" if args.no_cache else args.cache_dir,
            cache_max_bytes=parse_size(args.cache_max_size, "--cache-max-size") if args.cache_max_size else None,
            force=args.force,
        )
        if args.quiet:
            compile_model(args.model_dir, args.out_dir, options)
        else:
            console = Console(stderr=True)
            with RichStageListener(console) as listener:
                report = compile_model(args.model_dir, args.out_dir, options, listener=listener)
            Console().print(summary(report, Path(args.out_dir)))
            Console().print(f"artifact written to {args.out_dir}")
        if args.export_onnx:
            from xllm_compiler.onnx import export_artifact

            written = export_artifact(args.out_dir, args.export_onnx)
            if not args.quiet:
                Console().print(f"ONNX written to {args.export_onnx}: {', '.join(p.name for p in written)}")
        return EXIT_OK

    return guarded("xllm-compile", body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
