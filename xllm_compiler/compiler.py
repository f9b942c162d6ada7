"""The compile pipeline: checkpoint -> capture -> passes -> buckets -> artifact, one stage at a time."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import torch

from xllm_compiler import __version__
from xllm_compiler.artifact.manifest import FORMAT_VERSION, file_entries, sha256_file, write_manifest
from xllm_compiler.artifact.writer import (
    check_output_dir,
    referenced_weights,
    staged_output,
    write_graph,
    write_weights,
)
from xllm_compiler.buckets import Bucket, make_buckets, specialize
from xllm_compiler.capture import capture
from xllm_compiler.errors import OptionsError
from xllm_compiler.interface import RESERVED_BLOCKS, STEP_INPUTS, kv_cache_input
from xllm_compiler.models import ModelSpec, build_model, load_spec
from xllm_compiler.models.config import DTYPES
from xllm_compiler.options import (
    DEFAULT_DECODE_BUCKETS,
    DEFAULT_PREFILL_BUCKETS,
    MAX_SEQ_LEN_CAP,
    CompileOptions,
)
from xllm_compiler.passes import GraphPass, PassManager, select_passes
from xllm_compiler.passes.manager import count_nodes
from xllm_compiler.passes.verify import NumericsCheck
from xllm_compiler.report import CompileReport, StageListener
from xllm_compiler.runtime.platform import get_platform

#: Files of a checkpoint folder that define the model; their hashes make the source hash.
SOURCE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
)
TOKENIZER_FILE = "tokenizer.json"


def source_sha256(model_dir: Path) -> str:
    """One sha256 over the checkpoint's defining files (names and contents)."""
    digest = hashlib.sha256()
    files = sorted({p for pattern in SOURCE_PATTERNS for p in model_dir.glob(pattern) if p.is_file()})
    for path in files:
        digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def resolve_dtype(options: CompileOptions, spec: ModelSpec) -> torch.dtype:
    if options.dtype == "auto":
        return spec.dtype or torch.float32
    return DTYPES[options.dtype]


def resolve_max_seq_len(options: CompileOptions, spec: ModelSpec) -> int:
    if options.max_seq_len is None:
        return min(spec.max_position_embeddings, MAX_SEQ_LEN_CAP)
    if options.max_seq_len > spec.max_position_embeddings:
        raise OptionsError(
            f"max_seq_len {options.max_seq_len} exceeds the model's max_position_embeddings "
            f"{spec.max_position_embeddings}"
        )
    return options.max_seq_len


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
    passes = select_passes(options.passes, options.disable_passes) + list(extra_passes or [])
    report = CompileReport(listener=listener)

    with report.stage("config", "Reading config.json"):
        spec = load_spec(model_dir)
        dtype = resolve_dtype(options, spec)
        max_seq_len = resolve_max_seq_len(options, spec)
        buckets = make_buckets(
            options.decode_buckets or DEFAULT_DECODE_BUCKETS,
            options.prefill_buckets or DEFAULT_PREFILL_BUCKETS,
            max_seq_len,
            explicit_prefill=options.prefill_buckets is not None,
        )
    with report.stage("weights", "Loading weights"):
        model = build_model(model_dir, dtype, max_seq_len, spec)
        parameters = sum(p.numel() for p in model.parameters())
    kv_specs = [
        kv_cache_input(i, dtype, options.block_size, spec.num_kv_heads, spec.head_dim) for i in range(spec.num_layers)
    ]
    with report.stage("capture", "Tracing with torch.export"):
        gm = capture(model, STEP_INPUTS, kv_specs)
        del model
        nodes_captured = count_nodes(gm)
    with report.stage("passes", "Running graph passes"):
        check = NumericsCheck(gm, dtype) if options.verify else None
        dump = Path(options.debug_dump) if options.debug_dump else None
        records = PassManager(passes, check=check, dump_dir=dump).run(gm)
    with report.stage("buckets", "Specialising buckets"):
        bucket_graphs = {bucket: specialize(gm, bucket) for bucket in buckets}

    report.sections.update(
        {
            "xllm_compiler_version": __version__,
            "torch_version": torch.__version__,
            "model": {
                "architecture": spec.architecture,
                "num_layers": spec.num_layers,
                "parameters": parameters,
                "dtype": str(dtype).removeprefix("torch."),
            },
            "graph": {"nodes_captured": nodes_captured, "nodes_after_passes": count_nodes(gm)},
            "passes": [r.to_json() for r in records],
            "buckets": [{**b.to_json(), "nodes": count_nodes(g)} for b, g in bucket_graphs.items()],
        }
    )
    with report.stage("write", "Writing the artifact"), staged_output(out_dir, options.force, model_dir) as root:
        files = [write_weights(root, referenced_weights([gm, *bucket_graphs.values()]))]
        graph_files = {"dynamic": write_graph(root, "dynamic", gm)}
        graph_files.update({b.name: write_graph(root, b.name, g) for b, g in bucket_graphs.items()})
        files += graph_files.values()
        if (model_dir / TOKENIZER_FILE).is_file():
            shutil.copyfile(model_dir / TOKENIZER_FILE, root / TOKENIZER_FILE)
            files.append(TOKENIZER_FILE)
        manifest = _manifest(model_dir, spec, dtype, max_seq_len, options, platform.name, buckets, graph_files, records)
        report_json = report.to_json()
        (root / "report.json").write_text(_dumps(report_json))
        files.append("report.json")
        manifest["files"] = file_entries(root, files)
        write_manifest(root, manifest)
    return report.to_json()


def _dumps(data: Any) -> str:
    import json

    return json.dumps(data, indent=2) + "\n"


def _manifest(
    model_dir: Path,
    spec: ModelSpec,
    dtype: torch.dtype,
    max_seq_len: int,
    options: CompileOptions,
    device: str,
    buckets: list[Bucket],
    graph_files: dict[str, str],
    records,
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "created_by": {"xllm_compiler": __version__, "torch": torch.__version__},
        "source": {"path": str(model_dir.absolute()), "sha256": source_sha256(model_dir)},
        "options": {
            "dtype": options.dtype,
            "device": options.device,
            "decode_buckets": list(options.decode_buckets or DEFAULT_DECODE_BUCKETS),
            "prefill_buckets": [b.num_tokens for b in buckets if b.phase == "prefill"],
            "max_seq_len": max_seq_len,
            "block_size": options.block_size,
            "passes": options.passes,
            "disable_passes": list(options.disable_passes),
        },
        "model": {
            "architecture": spec.architecture,
            "vocab_size": spec.vocab_size,
            "num_layers": spec.num_layers,
            "num_kv_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim,
            "dtype": str(dtype).removeprefix("torch."),
            "max_seq_len": max_seq_len,
            "bos_token_id": spec.bos_token_id,
            "eos_token_ids": list(spec.eos_token_ids),
        },
        "target_device": device,
        "kv_cache": {"block_size": options.block_size, "reserved_blocks": RESERVED_BLOCKS},
        "inputs": [
            {"name": s.name, "dtype": str(s.dtype).removeprefix("torch."), "shape": list(s.shape)} for s in STEP_INPUTS
        ],
        "passes": [{"name": r.name, "version": r.version} for r in records],
        "buckets": [b.to_json() for b in buckets],
        "graphs": graph_files,
        "tokenizer": TOKENIZER_FILE if (model_dir / TOKENIZER_FILE).is_file() else None,
    }
