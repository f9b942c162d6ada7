"""Export one bucket of an artifact: its graph rebuilt over its weights, traced by torch.onnx's dynamo exporter.

Which graph: bucket graphs are memory-planned (ops rewritten to ``*_out`` forms writing into views of one
arena), which ONNX has no use for. At tensor-parallel size 1 a bucket graph is the dynamic graph
specialised to the bucket's sizes and memory-planned, nothing else; so the export reads the dynamic graph
and lets ``torch.export`` specialise it by tracing it with inputs of the bucket's sizes. Two dims stay
symbolic: the KV pool's ``num_blocks`` (the ONNX caller sizes its own pool) and the block table's width.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import fx

from xllm_compiler.artifact.graph_format import deserialize_graph
from xllm_compiler.artifact.manifest import read_manifest
from xllm_compiler.artifact.schema import Manifest
from xllm_compiler.buckets.policy import ONE_ROW_PER_SEQUENCE, Bucket
from xllm_compiler.dtypes import MODEL_DTYPES
from xllm_compiler.errors import ArtifactError, OptionsError
from xllm_compiler.interface import MAX_BLOCKS_PER_SEQ, NUM_BLOCKS, STEP_INPUTS
from xllm_compiler.onnx.functional import functionalize_kv_cache
from xllm_compiler.onnx.translations import OPSET, translation_table

#: A KV pool size for tracing only: ``num_blocks`` is a symbolic dim of the exported model.
_TRACE_BLOCKS = 4
_PRESENT = "present_{}"
#: protobuf's limit on one file: larger models keep their weights in ``path`` + ``.data``.
_PROTOBUF_LIMIT = 2**31


def _require_packages() -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise OptionsError(f"ONNX export needs {' and '.join(missing)}: pip install 'xllm-compiler[onnx]'")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's notes that say nothing about our graphs: optional torchvision ops it skips, the
    cache inputs sharing one num_blocks dim (as meant), a deprecation inside torch.export."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*The axis name: num_blocks will not be used")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def _find_bucket(manifest: Manifest, root: Path, phase: str, num_tokens: int) -> Bucket:
    buckets = [e.bucket for e in manifest.buckets if e.phase == phase]
    if not buckets:
        phases = sorted({e.phase for e in manifest.buckets})
        raise OptionsError(f"phase '{phase}' is not one of {', '.join(phases)} in artifact {root}")
    for bucket in buckets:
        if bucket.num_tokens == num_tokens:
            return bucket
    sizes = ", ".join(str(b.num_tokens) for b in sorted(buckets))
    raise OptionsError(f"artifact {root} has no {phase} bucket of {num_tokens} tokens (its {phase} buckets: {sizes})")


def _max_blocks_per_seq(manifest: Manifest) -> int:
    return -(-manifest.model.max_seq_len // manifest.kv_cache.block_size)


def _example_inputs(manifest: Manifest, bucket: Bucket, caches: int) -> tuple[torch.Tensor, ...]:
    """Zeros of the bucket's sizes, in the calling convention's order, then the KV caches."""
    block_size = manifest.kv_cache.block_size
    sizes = {**bucket.sizes(), MAX_BLOCKS_PER_SEQ: _max_blocks_per_seq(manifest)}
    steps = [torch.zeros([sizes[d] if isinstance(d, str) else d for d in s.shape], dtype=s.dtype) for s in STEP_INPUTS]
    model = manifest.model
    cache_shape = (2, _TRACE_BLOCKS, block_size, model.num_kv_heads, model.head_dim)
    return (*steps, *(torch.zeros(cache_shape, dtype=MODEL_DTYPES[model.dtype]) for _ in range(caches)))


def _dynamic_shapes(manifest: Manifest, caches: int) -> list[dict[int, Any] | None]:
    """The dims the ONNX model keeps symbolic: the pool's ``num_blocks``, and the block table's width, so
    that a caller may pass only the blocks its longest sequence uses (attention costs what it gathers)."""
    width = torch.export.Dim(MAX_BLOCKS_PER_SEQ, min=1, max=_max_blocks_per_seq(manifest))
    dims = [{i: width for i, d in enumerate(s.shape) if d == MAX_BLOCKS_PER_SEQ} or None for s in STEP_INPUTS]
    return [*dims, *[{1: torch.export.Dim(NUM_BLOCKS, min=2)}] * caches]


def _graph_module(root: Path, manifest: Manifest) -> tuple[fx.GraphModule, list[str]]:
    """The artifact's dynamic graph over its weights, its KV caches made explicit outputs."""
    rel = manifest.fallback_graph
    try:
        data = json.loads((root / rel).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"artifact file {rel} is not valid JSON ({exc})") from None
    graph = deserialize_graph(data, torch.device("cpu"), where=f"artifact file {rel}")
    caches = functionalize_kv_cache(graph)
    weights = load_file(str(root / manifest.tensor_parallel.weights[0]))
    return fx.GraphModule(weights, graph), caches


def export_onnx(out_dir: str | Path, path: str | Path, phase: str, num_tokens: int) -> Path:
    """Write the ``phase`` bucket of ``num_tokens`` tokens of artifact ``out_dir`` as the ONNX model ``path``.

    Inputs: the calling convention (``xllm_compiler.interface.STEP_INPUTS``) at the bucket's sizes (the
    block table's width symbolic, at most the artifact's), then ``kv_cache_{i}`` per layer,
    [2, num_blocks, block_size, kv_heads, head_dim] (num_blocks symbolic), zeroed before first use.
    Outputs: ``logits`` [num_seqs, vocab], then ``present_kv_cache_{i}``, each layer's updated cache.
    Weights are initializers; past 2 GB they go to ``path`` + ``.data``. Returns ``path``. Raises
    ``OptionsError`` for a bucket the artifact lacks, a tensor-parallel artifact, or missing packages.
    """
    root = Path(out_dir)
    manifest = _read(root)
    bucket = _find_bucket(manifest, root, phase, num_tokens)
    gm, caches = _graph_module(root, manifest)
    return _export(gm, caches, manifest, bucket, Path(path))


def export_artifact(out_dir: str | Path, dest: str | Path) -> list[Path]:
    """Every bucket of artifact ``out_dir`` as ``dest/<bucket>.onnx`` (what ``--export-onnx DIR`` writes)."""
    root = Path(out_dir)
    manifest = _read(root)
    gm, caches = _graph_module(root, manifest)
    buckets = [entry.bucket for entry in manifest.buckets]
    return [_export(gm, caches, manifest, b, Path(dest) / f"{b.name}.onnx") for b in buckets]


def _read(root: Path) -> Manifest:
    """The manifest of an artifact that can be exported (every file's hash checked: the weights are read)."""
    _require_packages()
    manifest = read_manifest(root, verify=True)
    if manifest.tensor_parallel.size != 1:
        size = manifest.tensor_parallel.size
        raise OptionsError(f"artifact {root} is tensor-parallel (tp={size}): only tp=1 artifacts export to ONNX")
    return manifest


def _export(gm: fx.GraphModule, caches: list[str], manifest: Manifest, bucket: Bucket, path: Path) -> Path:
    one_row_per_sequence = bucket.phase in ONE_ROW_PER_SEQUENCE  # the decode attention's premise
    if one_row_per_sequence and bucket.num_seqs != bucket.num_tokens:
        raise ArtifactError(f"bucket {bucket.name} has {bucket.num_seqs} sequences, not {bucket.num_tokens}")
    table = translation_table(decode=one_row_per_sequence)
    untranslated = sorted({str(n.target) for n in gm.graph.nodes if _is_ours(n.target) and n.target not in table})
    if untranslated:  # e.g. MoE's xllm.moe_experts: refused here, not deep inside torch.onnx
        raise OptionsError(f"op {', '.join(untranslated)} has no ONNX form yet: this artifact cannot be exported")
    with _quiet_exporter():
        onnx_program = torch.onnx.export(
            gm.eval(),
            _example_inputs(manifest, bucket, len(caches)),
            dynamo=True,
            input_names=[s.name for s in STEP_INPUTS] + caches,
            output_names=["logits", *(_PRESENT.format(c) for c in caches)],
            dynamic_shapes=_dynamic_shapes(manifest, len(caches)),
            custom_translation_table=table,
            opset_version=OPSET,
            verbose=False,
        )
    assert onnx_program is not None  # only the legacy (dynamo=False) exporter returns None
    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(t.numel() * t.element_size() for t in gm.state_dict().values())
    onnx_program.save(str(path), external_data=weight_bytes >= _PROTOBUF_LIMIT)
    return path


def _is_ours(target: object) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.namespace in ("xllm", "xllm_onnx")


def onnx_inputs(step_inputs: dict[str, torch.Tensor], caches: list[torch.Tensor]) -> dict[str, Any]:
    """An onnxruntime feed (numpy arrays by input name) from a step's inputs and the per-layer caches."""
    feed = {s.name: step_inputs[s.name].numpy() for s in STEP_INPUTS}
    feed.update({f"kv_cache_{i}": cache.numpy() for i, cache in enumerate(caches)})
    return feed
