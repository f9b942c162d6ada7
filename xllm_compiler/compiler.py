"""The compile pipeline: checkpoint -> capture -> passes -> buckets -> artifact, one stage at a time.

``plan_compile`` settles everything the output depends on (model, dtype, lengths, buckets, passes,
the checkpoint's hash) into a cache key before any heavy work; a compile cache hit then assembles the
artifact from the cached entry, and a miss runs the stages and fills the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from xllm_compiler import __version__
from xllm_compiler.artifact.chat_template import (
    CHAT_TEMPLATE_FILE,
    TEMPLATE_JINJA,
    TOKENIZER_CONFIG,
    find_chat_template,
    write_chat_template,
)
from xllm_compiler.artifact.graph_format import GRAPH_FORMAT_VERSION, serialize_graph
from xllm_compiler.artifact.manifest import file_entries, read_manifest, write_manifest
from xllm_compiler.artifact.schema import (
    FALLBACK_GRAPH,
    FORMAT_VERSION,
    MANIFEST,
    BucketEntry,
    CheckpointQuantizationRecord,
    CreatedBy,
    FileEntry,
    KVCacheLayout,
    LoweringRecord,
    Manifest,
    ModelInfo,
    PassEntry,
    QuantizationRecord,
    RequestedOptions,
    Source,
    TensorParallelLayout,
    calling_convention,
)
from xllm_compiler.artifact.writer import (
    check_output_dir,
    referenced_weights,
    staged_output,
    weights_file,
    write_graph,
    write_weights,
)
from xllm_compiler.buckets import DECODE, PREFILL, VERIFY, Bucket, make_buckets
from xllm_compiler.buckets.specialize import specialize
from xllm_compiler.buckets.traffic import Trace, best_buckets, padded_tokens, padding_fraction, read_trace
from xllm_compiler.cache import CompileCache, Lookup, cache_key, default_cache_dir
from xllm_compiler.capture import capture
from xllm_compiler.dtypes import MODEL_DTYPES, dtype_name
from xllm_compiler.errors import CompileError, OptionsError
from xllm_compiler.experts.placement import Placement, placement_from_stats, placement_report
from xllm_compiler.interface import RESERVED_BLOCKS, STEP_INPUTS, kv_cache_input
from xllm_compiler.models import ModelSpec, build_model, load_spec
from xllm_compiler.models.config import expanded_kv_width, kv_cache_geometry
from xllm_compiler.models.int4_linear import Int4Linear, parameter_count
from xllm_compiler.models.int_quant import IntQuant
from xllm_compiler.models.parallel import parallel_ranks
from xllm_compiler.models.quantization import quantization_of
from xllm_compiler.ops import native
from xllm_compiler.options import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_DECODE_BUCKETS,
    DEFAULT_GROUP_SIZE,
    DEFAULT_PREFILL_BUCKETS,
    MAX_SEQ_LEN_CAP,
    CompileOptions,
)
from xllm_compiler.passes import GraphPass, PassManager, bucket_pipeline, default_pipeline, select_passes
from xllm_compiler.passes.comm.collectives import comm_report
from xllm_compiler.passes.comm.split_micro_batches import MicroBatchOptions
from xllm_compiler.passes.manager import count_nodes
from xllm_compiler.passes.memory.plan_memory import PlanMemoryOptions
from xllm_compiler.passes.quant.quantize_linear_weights import QuantizeOptions, quantize_linear_weights
from xllm_compiler.passes.verify import NumericsCheck
from xllm_compiler.report import CompileReport, StageListener
from xllm_compiler.runtime.memory_budget import expanded_kv_bytes_per_token, kv_bytes_per_token, plan_load_memory
from xllm_compiler.runtime.platform import get_platform
from xllm_compiler.runtime.platform.lowering import Lowering
from xllm_compiler.tokenizer_check import check_tokenizer

#: Files of a checkpoint folder that define the model; their hashes make the source hash.
SOURCE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    TOKENIZER_CONFIG,  # its chat_template, carried into the artifact
    TEMPLATE_JINJA,
)
TOKENIZER_FILE = "tokenizer.json"
REPORT_FILE = "report.json"


def source_sha256(model_dir: Path, cache: CompileCache | None = None) -> str:
    """One sha256 over the checkpoint's defining files (names and contents)."""
    hasher = cache or CompileCache(None)
    digest = hashlib.sha256()
    files = sorted({p for pattern in SOURCE_PATTERNS for p in model_dir.glob(pattern) if p.is_file()})
    for path in files:
        digest.update(f"{path.name}\0{hasher.file_sha256(path)}\n".encode())
    return digest.hexdigest()


@functools.cache
def code_sha256() -> str:
    """One sha256 over this installation's Python sources (the package, and models/, passes/, runtime/
    where they are installed from). Pass, format and lowering versions say when a change is meant to
    change artifacts; this catches the changes that move none of them (a model builder's, a capture
    detail), so a compile after an edit misses the cache instead of serving what the old code wrote."""
    import xllm_compiler.models
    import xllm_compiler.passes
    import xllm_compiler.runtime

    digest = hashlib.sha256()
    packages = (xllm_compiler, xllm_compiler.models, xllm_compiler.passes, xllm_compiler.runtime)
    roots = sorted({Path(package.__file__).resolve().parent for package in packages})
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{path.relative_to(root.parent)}\0".encode() + path.read_bytes())
    return digest.hexdigest()


def resolve_dtype(options: CompileOptions, spec: ModelSpec) -> torch.dtype:
    if options.dtype == "auto":
        return spec.dtype or torch.float32
    return MODEL_DTYPES[options.dtype]


@dataclass(frozen=True)
class MaxSeqLen:
    """The max_seq_len a compile uses and why; the report records it, so that a capped length is no surprise."""

    value: int
    max_position_embeddings: int
    chosen_by: str
    """"option" (max_seq_len was given) or "default" (max_position_embeddings, capped at MAX_SEQ_LEN_CAP)."""

    @property
    def capped(self) -> bool:
        return self.value < self.max_position_embeddings and self.chosen_by == "default"

    def to_json(self) -> dict[str, Any]:
        """The compile report's "limits" section."""
        return {
            "max_seq_len": self.value,
            "max_position_embeddings": self.max_position_embeddings,
            "max_seq_len_cap": MAX_SEQ_LEN_CAP,
            "capped": self.capped,
            "chosen_by": self.chosen_by,
        }


def resolve_max_seq_len(options: CompileOptions, spec: ModelSpec) -> MaxSeqLen:
    if options.max_seq_len is None:
        return MaxSeqLen(min(spec.max_position_embeddings, MAX_SEQ_LEN_CAP), spec.max_position_embeddings, "default")
    if options.max_seq_len > spec.max_position_embeddings:
        raise OptionsError(
            f"max_seq_len {options.max_seq_len} exceeds the model's max_position_embeddings "
            f"{spec.max_position_embeddings}"
        )
    return MaxSeqLen(options.max_seq_len, spec.max_position_embeddings, "option")


def resolve_cache(options: CompileOptions) -> CompileCache:
    if options.cache_dir == "":
        return CompileCache(None)
    return CompileCache(Path(options.cache_dir) if options.cache_dir else default_cache_dir(), options.cache_max_bytes)


@dataclass
class CompilePlan:
    """Everything a compile's output depends on, decided before the heavy stages run."""

    model_dir: Path
    spec: ModelSpec
    dtype: torch.dtype
    limits: MaxSeqLen
    buckets: list[Bucket]
    lowering: Lowering
    passes: list[GraphPass]
    bucket_passes: list[GraphPass]
    source_sha256: str
    trace: Trace | None
    key: str
    experts: tuple[Placement, list[list[int]]] | None = None
    """With --expert-placement: the experts' plan, and the measured loads it was planned from."""

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def max_seq_len(self) -> int:
        return self.limits.value

    @property
    def device(self) -> str:
        return self.lowering.platform


def _bucket_sizes(
    options: CompileOptions, trace: Trace | None, max_seq_len: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    decode = options.decode_buckets or DEFAULT_DECODE_BUCKETS
    prefill = options.prefill_buckets or DEFAULT_PREFILL_BUCKETS
    if trace is None:
        return decode, prefill
    chosen_decode = best_buckets(trace.sizes[DECODE], options.num_buckets or len(decode))
    chosen_prefill = best_buckets(trace.sizes[PREFILL], options.num_buckets or len(prefill), limit=max_seq_len)
    return tuple(chosen_decode) or decode, tuple(chosen_prefill) or prefill


def plan_compile(
    model_dir: Path,
    options: CompileOptions,
    lowering: Lowering,
    passes: list[GraphPass],
    bucket_passes: list[GraphPass],
    cache: CompileCache,
) -> CompilePlan:
    spec = load_spec(model_dir)
    parallel_ranks(options.tp, options.ep)[0].check(spec)  # refuse a layout the model cannot take, now
    moe_layers, num_experts = (sum(spec.moe.sparse_layers), spec.moe.num_experts) if spec.moe else (0, 0)
    experts = placement_from_stats(
        options.expert_placement, options.redundant_experts, options.ep, moe_layers, num_experts
    )
    dtype = resolve_dtype(options, spec)
    limits = resolve_max_seq_len(options, spec)
    max_seq_len = limits.value
    trace = read_trace(Path(options.buckets_from)) if options.buckets_from else None
    decode, prefill = _bucket_sizes(options, trace, max_seq_len)
    explicit = options.prefill_buckets is not None and trace is None
    buckets = make_buckets(
        decode, prefill, max_seq_len, explicit_prefill=explicit, num_speculative_tokens=options.num_speculative_tokens
    )
    source = source_sha256(model_dir, cache)
    key = cache_key(
        {
            "format_version": FORMAT_VERSION,
            "graph_format_version": GRAPH_FORMAT_VERSION,
            "xllm_compiler": __version__,
            "code": code_sha256(),
            "torch": torch.__version__,
            "source_sha256": source,
            "dtype": str(dtype),
            "device": lowering.platform,
            "lowering": [lowering.platform, lowering.version],
            "max_seq_len": max_seq_len,
            "block_size": options.block_size,
            "tp": options.tp,
            "ep": options.ep,
            "expert_placement": experts[0].to_json() if experts else None,
            "num_speculative_tokens": options.num_speculative_tokens,
            "quantize": [options.quantize, options.quantize_lm_head, options.group_size] if options.quantize else None,
            "buckets": [b.to_json() for b in buckets],
            "passes": [[p.name, p.version, p.identity()] for p in [*passes, *bucket_passes]],
            "trace": sorted((phase, sorted(c.items())) for phase, c in trace.sizes.items()) if trace else None,
        }
    )
    return CompilePlan(
        model_dir, spec, dtype, limits, buckets, lowering, passes, bucket_passes, source, trace, key, experts
    )


def with_platform_block_size(options: CompileOptions, lowering: Lowering) -> CompileOptions:
    """``options`` with a block size: the one asked for, else the smallest the platform's paged-attention
    kernels take that is at least DEFAULT_BLOCK_SIZE (16 on cpu, 128 on npu)."""
    if options.block_size is not None:
        return options
    multiple = lowering.block_size_multiple
    return dataclasses.replace(options, block_size=-(-DEFAULT_BLOCK_SIZE // multiple) * multiple)


def bucket_passes_for(options: CompileOptions, lowering: Lowering) -> list[GraphPass]:
    """The bucket passes ``options`` select, memory planned for ``lowering``'s platform (an op whose out
    form has no kernel there stays functional); OptionsError when its attention kernels cannot take
    ``options.block_size``. The NPU audit (tests/test_npu_lowering_audit.py) plans through it on CPU."""
    lowering.check_block_size(with_platform_block_size(options, lowering).block_size)
    micro_batches = MicroBatchOptions(min_tokens=options.micro_batch_min_tokens)
    memory = PlanMemoryOptions(out_forms=lowering.out_forms())
    return select_passes(options.passes, options.disable_passes, pipeline=bucket_pipeline(micro_batches, memory))


def graph_passes_for(options: CompileOptions) -> list[GraphPass]:
    """The graph passes ``options`` select, the weight quantization configured as asked; OptionsError when a
    quantization is asked for with --verify, or with a selection that leaves out the pass that does it."""
    if options.quantize and options.verify:
        raise OptionsError(
            f"--verify holds every pass to float tolerance, and quantize '{options.quantize}' changes results by "
            "design (weight rounding: about 1% of the largest logit at int8, more at int4): verify the unquantized "
            "compile instead"
        )
    quantize = (
        QuantizeOptions(options.quantize, options.quantize_lm_head, options.group_size or DEFAULT_GROUP_SIZE)
        if options.quantize
        else None
    )
    passes = select_passes(options.passes, options.disable_passes, pipeline=default_pipeline(quantize))
    if options.quantize and quantize_linear_weights.name not in {p.name for p in passes}:
        raise OptionsError(
            f"quantize '{options.quantize}' needs the pass {quantize_linear_weights.name}, which the pass "
            "selection (--passes / --disable-pass) leaves out"
        )
    return passes


def compile_model(
    model_dir: Path | str,
    out_dir: Path | str,
    options: CompileOptions,
    listener: StageListener | None = None,
    extra_passes: list[GraphPass] | None = None,
) -> dict[str, Any]:
    """Compile ``model_dir`` into the artifact ``out_dir``; returns the report (also in report.json)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_output_dir(out_dir, options.force, model_dir)
    platform = get_platform(options.device)
    lowering = platform.lowering()
    options = with_platform_block_size(options, lowering)
    passes = graph_passes_for(options) + list(extra_passes or [])
    bucket_passes = bucket_passes_for(options, lowering)
    cache = resolve_cache(options)
    report = CompileReport(listener=listener)
    with report.stage("config", "Reading config.json and planning"):
        plan = plan_compile(model_dir, options, lowering, passes, bucket_passes, cache)
        report.sections["limits"] = plan.limits.to_json()
        report.sections["tokenizer"] = check_tokenizer(model_dir / TOKENIZER_FILE, plan.spec.vocab_size).to_json()
        find_chat_template(model_dir)  # an unreadable tokenizer_config.json fails before the heavy stages
    if platform.name == "cpu" and native.needs_build():  # so the first load need not wait a minute for them
        with report.stage("kernels", native.BUILD_DESCRIPTION):
            native.build_kernels()
    reuse = cache.enabled and not (options.debug_dump or options.verify)
    waiting = "Waiting for another compile of this model and options (it holds {})"  # then this one hits
    with cache.locked(plan.key, lambda lock: report.stage("lock", waiting.format(lock))):
        with report.stage("cache", "Looking up the compile cache"):
            found = cache.lookup(plan.key) if reuse else Lookup()
        if found.entry is not None:
            with staged_output(out_dir, options.force, model_dir) as root:
                with report.stage("restore", "Reusing the cached compile"):
                    manifest = _restore(cache, found.entry, root, plan, report)
                known = {rel: e for rel, e in manifest.files.items() if rel != REPORT_FILE}
                _finish(root, manifest, report, list(known), known)
        else:
            report.sections["cache"] = found.report(plan.key)
            _build(plan, options, report, out_dir)
            cache.store(plan.key, out_dir)
    return report.to_json()


def _checkpoint_quantization(model_dir: Path, model: torch.nn.Module) -> CheckpointQuantizationRecord | None:
    """The manifest's record of the checkpoint's packed layers ``model`` kept in their integers (None: none)."""
    layers = sum(isinstance(m, Int4Linear) for m in model.modules())
    scheme = quantization_of(model_dir)
    if not layers or not isinstance(scheme, IntQuant):
        return None
    return CheckpointQuantizationRecord(scheme.method, scheme.bits, scheme.group_size, scheme.desc_act, layers)


def _build(plan: CompilePlan, options: CompileOptions, report: CompileReport, out_dir: Path) -> None:
    """Run the stages. With tensor parallelism every rank is built (its own weight shards) and must
    yield the same graphs: one graph set is written, with one weights file per rank. With expert
    parallelism likewise, each rank's file holding its own experts (models/parallel.py)."""
    spec, dtype = plan.spec, plan.dtype
    ranks = parallel_ranks(options.tp, options.ep, plan.experts[0] if plan.experts else None)
    with report.stage("weights", "Loading weights"):
        models = [build_model(plan.model_dir, dtype, plan.max_seq_len, spec, p) for p in ranks]
        parameters = parameter_count(models[0])
        int4_layers = _checkpoint_quantization(plan.model_dir, models[0])
    planes, kv_heads, kv_dim = kv_cache_geometry(spec, options.tp)
    kv_specs = [kv_cache_input(i, dtype, options.block_size, kv_heads, kv_dim, planes) for i in range(spec.num_layers)]
    with report.stage("capture", "Tracing with torch.export"):
        graphs = [capture(model, STEP_INPUTS, kv_specs) for model in models]
        del models
        nodes_captured = count_nodes(graphs[0])
    with report.stage("passes", "Running graph passes"):
        dump = Path(options.debug_dump) if options.debug_dump else None
        records = []
        for rank, gm in enumerate(graphs):
            check = NumericsCheck(gm, dtype) if options.verify and len(ranks) == 1 else None
            records.append(PassManager(plan.passes, check=check, dump_dir=dump if rank == 0 else None).run(gm))
    bucket_graphs: list[dict[Bucket, fx.GraphModule]] = [{} for _ in graphs]
    seconds: dict[Bucket, float] = {}
    matches: dict[Bucket, dict[str, int]] = {}  # the bucket passes' matches (the same on every rank)
    with report.stage("buckets", "Specialising and planning buckets"):
        for bucket in plan.buckets:
            start = time.perf_counter()
            for rank, gm in enumerate(graphs):
                bucket_graphs[rank][bucket] = specialize(gm, bucket)
                records_of_bucket = PassManager(plan.bucket_passes).run(bucket_graphs[rank][bucket])
                matches[bucket] = {r.name: r.matches for r in records_of_bucket if r.matches}
            seconds[bucket] = time.perf_counter() - start
    gm, buckets0 = graphs[0], bucket_graphs[0]
    report.sections.update(
        {
            "xllm_compiler_version": __version__,
            "torch_version": torch.__version__,
            "model": {
                "architecture": spec.architecture,
                "num_layers": spec.num_layers,
                "parameters": parameters,
                "dtype": plan.dtype_name,
                "tensor_parallel": options.tp,
                "expert_parallel": options.ep,
                "quantize": options.quantize,
                "group_size": options.group_size,
                "checkpoint_quantization": dataclasses.asdict(int4_layers) if int4_layers else None,
            },
            "graph": {"nodes_captured": nodes_captured, "nodes_after_passes": count_nodes(gm)},
            "passes": [r.to_json() for r in records[0]],
            "buckets": _bucket_report(plan, buckets0, seconds, matches),
            "memory": {b.name: g.meta["memory_plan"].summary() for b, g in buckets0.items() if "memory_plan" in g.meta},
            "comm": {b.name: comm_report(g) for b, g in buckets0.items()} if len(ranks) > 1 else {},
            **({"experts": placement_report(*plan.experts)} if plan.experts else {}),
        }
    )
    with staged_output(out_dir, options.force, plan.model_dir) as root:
        with report.stage("write", "Writing the artifact"):
            weight_files = [
                write_weights(root, referenced_weights([g, *b.values()]), weights_file(rank, len(ranks)))
                for rank, (g, b) in enumerate(zip(graphs, bucket_graphs, strict=True))
            ]
            graph_files = {FALLBACK_GRAPH: write_graph(root, FALLBACK_GRAPH, gm)}
            graph_files.update({b.name: write_graph(root, b.name, g) for b, g in buckets0.items()})
            _check_ranks_agree(graphs, bucket_graphs)
            files = [*weight_files, *graph_files.values()]
            if (plan.model_dir / TOKENIZER_FILE).is_file():
                shutil.copyfile(plan.model_dir / TOKENIZER_FILE, root / TOKENIZER_FILE)
                files.append(TOKENIZER_FILE)
            if chat_template := write_chat_template(plan.model_dir, root):
                files.append(chat_template)
        manifest = _manifest(plan, options, graph_files, weight_files, records[0], int4_layers)
        _finish(root, manifest, report, files)


def _check_ranks_agree(graphs: list[fx.GraphModule], bucket_graphs: list[dict[Bucket, fx.GraphModule]]) -> None:
    """Every rank must have traced the very same graphs: one graph set serves them all, and ranks that
    issued different collectives (or in another order) would deadlock."""
    reference = [serialize_graph(graphs[0]), *(serialize_graph(g) for g in bucket_graphs[0].values())]
    for rank in range(1, len(graphs)):
        mine = [serialize_graph(graphs[rank]), *(serialize_graph(g) for g in bucket_graphs[rank].values())]
        if mine != reference:
            raise CompileError(f"tensor-parallel rank {rank} traced a different graph than rank 0")


def _finish(
    root: Path, manifest: Manifest, report: CompileReport, files: list[str], known: dict[str, FileEntry] | None = None
) -> None:
    """Hash the artifact's files, write report.json (with what a load of them will take), then the
    manifest with the hash of every file, the report's included. ``known`` entries (files restored from
    a verified cache entry) are not hashed again."""
    known = known or {}
    entries = {**known, **file_entries(root, [f for f in files if f not in known])}
    report.sections["load_memory"] = load_memory_report(dataclasses.replace(manifest, files=entries), report)
    (root / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    entries.update(file_entries(root, [REPORT_FILE]))
    manifest = dataclasses.replace(manifest, files=dict(sorted(entries.items())))
    manifest.check()
    write_manifest(root, manifest)


def load_memory_report(manifest: Manifest, report: CompileReport) -> dict[str, Any]:
    """What loading the artifact will take (weights, the largest arena, the default KV pool), sized for
    this machine's memory as load() sizes it; a plan that cannot fit here is a warning in the report."""
    arena = max((m["arena_bytes"] for m in report.sections.get("memory", {}).values()), default=0)
    section: dict[str, Any] = {
        "kv_bytes_per_token": kv_bytes_per_token(manifest),
        "kv_bytes_per_sequence": kv_bytes_per_token(manifest) * manifest.model.max_seq_len,
        **({"expanded_kv_bytes_per_token": expanded} if (expanded := expanded_kv_bytes_per_token(manifest)) else {}),
    }
    platform = get_platform(manifest.target_device)
    try:
        memory = plan_load_memory(manifest, arena, platform.free_memory_bytes(), platform.total_memory_bytes())
    except OptionsError as exc:
        section.update(weight_bytes=manifest.weight_bytes, arena_bytes=arena, fits_this_machine=False)
        report.sections.setdefault("warnings", []).append(f"a load on this machine will fail: {exc}")
        return section
    return {**section, **memory.to_json(), "fits_this_machine": True}


def _restore(cache: CompileCache, entry: Path, root: Path, plan: CompilePlan, report: CompileReport) -> Manifest:
    """Fill ``root`` from a cache entry; returns its manifest, to be rewritten with this compile's report.
    (The entry's files were verified by the cache lookup.)"""
    cached_report = json.loads((entry / REPORT_FILE).read_text())
    manifest = read_manifest(entry, verify=False)
    cache.restore(entry, root, skip={REPORT_FILE, MANIFEST})
    report.sections.update({k: v for k, v in cached_report.items() if k not in ("stages", "total_seconds")})
    report.sections["cache"] = {"key": plan.key, "hit": True}
    return dataclasses.replace(manifest, source=Source(str(plan.model_dir.absolute()), manifest.source.sha256))


def _bucket_report(
    plan: CompilePlan,
    graphs: dict[Bucket, fx.GraphModule],
    seconds: dict[Bucket, float],
    matches: dict[Bucket, dict[str, int]],
) -> dict:
    """Per phase: each bucket's size, specialisation time, nodes and bucket-pass matches, and padding
    against the trace."""
    report: dict[str, Any] = {}
    defaults = {DECODE: DEFAULT_DECODE_BUCKETS, PREFILL: DEFAULT_PREFILL_BUCKETS}
    for phase in (DECODE, PREFILL, VERIFY):
        sizes = sorted(b.num_tokens for b in plan.buckets if b.phase == phase)
        if not sizes:
            continue
        entries = []
        for bucket in sorted((b for b in plan.buckets if b.phase == phase), key=lambda b: b.num_tokens):
            entry = {**bucket.to_json(), "seconds": round(seconds[bucket], 5), "nodes": count_nodes(graphs[bucket])}
            entry["pass_matches"] = matches[bucket]
            if plan.trace is not None and phase in plan.trace.sizes:
                entry["padding_fraction"] = _bucket_padding(plan.trace.sizes[phase], sizes, bucket.num_tokens)
            entries.append(entry)
        report[phase] = {"buckets": entries}
        if plan.trace is not None and plan.trace.sizes.get(phase):
            counts = plan.trace.sizes[phase]
            default = [s for s in defaults[phase] if phase == DECODE or s <= plan.max_seq_len]
            report[phase]["trace"] = {
                "steps": sum(counts.values()),
                "padding_fraction": round(padding_fraction(counts, sizes), 5),
                "default_series": default[: len(sizes)] if len(default) > len(sizes) else default,
                "default_padding_fraction": round(padding_fraction(counts, default[: len(sizes)] or default), 5),
            }
    return report


def _bucket_padding(counts, sizes: list[int], bucket: int) -> float:
    """Padding fraction of the trace steps that land on ``bucket``."""
    below = max((s for s in sizes if s < bucket), default=0)
    landing = {s: c for s, c in counts.items() if below < s <= bucket}
    real = sum(s * c for s, c in landing.items())
    return round(padded_tokens(landing, [bucket]) / real, 5) if real else 0.0


def _manifest(
    plan: CompilePlan,
    options: CompileOptions,
    graph_files: dict[str, str],
    weight_files: list[str],
    records: list,
    int4_layers: CheckpointQuantizationRecord | None,
) -> Manifest:
    spec = plan.spec
    planes_heads_dim = kv_cache_geometry(spec, options.tp)
    return Manifest(
        created_by=CreatedBy(xllm_compiler=__version__, torch=torch.__version__),
        source=Source(path=str(plan.model_dir.absolute()), sha256=plan.source_sha256),
        cache_key=plan.key,
        options=RequestedOptions(
            dtype=options.dtype,
            device=options.device,
            passes=list(options.passes) if options.passes is not None else None,
            disable_passes=list(options.disable_passes),
            buckets_from=options.buckets_from,
            num_buckets=options.num_buckets,
            micro_batch_min_tokens=options.micro_batch_min_tokens,
        ),
        model=ModelInfo(
            architecture=spec.architecture,
            vocab_size=spec.vocab_size,
            num_layers=spec.num_layers,
            num_kv_heads=planes_heads_dim[1],
            head_dim=planes_heads_dim[2],
            dtype=plan.dtype_name,
            max_seq_len=plan.max_seq_len,
            max_position_embeddings=spec.max_position_embeddings,
            bos_token_id=spec.bos_token_id,
            eos_token_ids=list(spec.eos_token_ids),
        ),
        target_device=plan.device,
        lowering=LoweringRecord(plan.lowering.platform, plan.lowering.version),
        kv_cache=KVCacheLayout(
            block_size=options.block_size,
            reserved_blocks=RESERVED_BLOCKS,
            planes=planes_heads_dim[0],
            expanded_width=expanded_kv_width(spec, options.tp) if spec.mla is not None else 0,
        ),
        tensor_parallel=TensorParallelLayout(size=len(weight_files), weights=weight_files, expert_parallel=options.ep),
        inputs=calling_convention(),
        passes=[PassEntry(r.name, r.version) for r in records],
        buckets=[BucketEntry(b.phase, b.num_tokens, b.num_seqs, graph_files[b.name]) for b in plan.buckets],
        fallback_graph=graph_files[FALLBACK_GRAPH],
        num_speculative_tokens=options.num_speculative_tokens,
        quantization=_quantization(options, records),
        checkpoint_quantization=int4_layers,
        tokenizer=TOKENIZER_FILE if (plan.model_dir / TOKENIZER_FILE).is_file() else None,
        chat_template=CHAT_TEMPLATE_FILE if find_chat_template(plan.model_dir) else None,
    )


def _quantization(options: CompileOptions, records: list) -> QuantizationRecord | None:
    """The manifest's record of the weight quantization, with the number of linear layers it rewrote."""
    if not options.quantize:
        return None
    layers = sum(r.matches for r in records if r.name == quantize_linear_weights.name)
    granularity = "per_group" if options.quantize == "int4" else "per_output_channel"
    return QuantizationRecord(options.quantize, granularity, options.quantize_lm_head, layers, options.group_size)
