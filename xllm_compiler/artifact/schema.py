"""The artifact's manifest as typed records: the compiler writes a ``Manifest``, the runtime reads one.

This module is the only place that knows manifest.json's keys. ``Manifest.from_json`` checks every
field against its annotation and names the first bad one by its path (``model.num_layers must be
an integer, got 'x'``), then checks what the fields must agree on (every file the runtime reads is
hash-listed, one weights file per tensor-parallel rank, the graphs' calling convention is this
runtime's). Each fact is stored once: bucket sizes only in ``buckets``, the sequence limit only in
``model``, the block size only in ``kv_cache``, the parallel degree only in ``tensor_parallel``;
``options`` keeps just what the user asked for that left no other trace.

Format history: 1 (options repeated the bucket sizes, graphs keyed by bucket name); 2 (this one).
An artifact of another format version is refused with the versions named: recompile it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from xllm_compiler.buckets.policy import DECODE, PREFILL, VERIFY, Bucket
from xllm_compiler.dtypes import MODEL_DTYPES, dtype_name
from xllm_compiler.errors import ArtifactError
from xllm_compiler.interface import STEP_INPUTS

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
#: The name the fallback graph goes by among the bucket graphs (theirs: ``Bucket.name``).
FALLBACK_GRAPH = "dynamic"


@dataclass(frozen=True)
class CreatedBy:
    """Which versions wrote the artifact."""

    xllm_compiler: str
    torch: str


@dataclass(frozen=True)
class Source:
    """The checkpoint it was compiled from: its folder then, and the sha256 of its defining files."""

    path: str
    sha256: str


@dataclass(frozen=True)
class RequestedOptions:
    """What the user asked for that left no other trace in the manifest (for the record only)."""

    dtype: str
    """As asked ('auto' or a dtype name); the dtype it resolved to is ``model.dtype``."""
    device: str
    """As asked ('auto' or a device); the device it resolved to is ``target_device``."""
    passes: list[str] | None
    disable_passes: list[str]
    buckets_from: str | None
    num_buckets: int | None
    micro_batch_min_tokens: int


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know of the model: cache geometry, vocabulary, limits."""

    architecture: str
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    """Per tensor-parallel rank."""
    head_dim: int
    dtype: str
    max_seq_len: int
    """The longest prompt + generation the graphs and rope tables were built for."""
    max_position_embeddings: int
    """What the model itself declares (max_seq_len may be smaller: capped, or asked for)."""
    bos_token_id: int | None
    eos_token_ids: list[int]


@dataclass(frozen=True)
class KVCacheLayout:
    """The paged KV cache the graphs address: tokens per block, and blocks the pool keeps back."""

    block_size: int
    reserved_blocks: int
    planes: int = 2
    """Per layer: 2, keys and values of ``model.num_kv_heads`` heads of ``model.head_dim``; 1, multi-head
    latent attention's one row per token (num_kv_heads 1, head_dim kv_lora_rank + qk_rope_head_dim) that
    serves as key and value at once (ops/mla.py)."""
    expanded_width: int = 0
    """With planes 1: the values per token and layer that expanded keys and values would take on one rank
    (reported next to the latent's, for what MLA saves); 0 otherwise."""


@dataclass(frozen=True)
class TensorParallelLayout:
    """The parallel degree and each rank's weights file (one file per rank). ``size`` counts the ranks;
    ``expert_parallel`` > 1: they split the routed experts between them (attention replicated) instead
    of tensor-parallel sharding (models/parallel.py)."""

    size: int
    weights: list[str]
    expert_parallel: int = 1


@dataclass(frozen=True)
class LoweringRecord:
    """The lowering table (runtime/platform/lowering.py) the graphs were planned for: an op whose ``*_out``
    form has no kernel on that platform stays functional. Any platform may run them (every ``xllm::`` op
    keeps its torch composite); this says which one they were planned for."""

    platform: str
    table_version: int


@dataclass(frozen=True)
class QuantizationRecord:
    """How the linear layers' weights were quantized (passes/quant): the graphs call ``xllm::linear_w8`` on
    ``<weight>_int8`` tensors and their float32 ``<weight>_scale`` (int8), or ``xllm::linear_w4`` on packed
    ``<weight>_int4`` tensors and their float32 ``<weight>_scale`` and ``<weight>_offset`` (int4)."""

    scheme: str
    """'int8': symmetric, values in [-127, 127]; 'int4': asymmetric, values in [0, 15] above an offset."""
    granularity: str
    """'per_output_channel' (int8): one scale per row of each weight; 'per_group' (int4): one scale and
    offset per ``group_size`` consecutive inputs of each row."""
    lm_head: bool
    """Whether the LM head is among them."""
    linear_layers: int
    """How many linear layers the compile rewrote."""
    group_size: int | None = None
    """int4's group size; None for int8 (and in artifacts written before int4 existed)."""


@dataclass(frozen=True)
class CheckpointQuantizationRecord:
    """The linear layers a GPTQ / AWQ checkpoint stores as 4- or 8-bit integers, kept in them: the graphs
    call ``xllm::linear_w4`` on their ``qweight``, ``scale`` and ``offset`` (8 bits: two 4-bit planes) and,
    act-order or 8 bits, gather their input by ``input_order``; converted exactly at compile time
    (models/int_quant.py, models/int4_linear.py)."""

    method: str
    """'gptq' or 'awq', config.json's quant_method."""
    bits: int
    group_size: int
    """As the checkpoint declares it; -1: one group per row."""
    act_order: bool
    linear_layers: int
    """How many linear layers (before merging) run on the checkpoint's integers."""


@dataclass(frozen=True)
class GraphInput:
    """One input of the graphs' calling convention (xllm_compiler.interface.STEP_INPUTS)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class PassEntry:
    name: str
    version: int


@dataclass(frozen=True)
class BucketEntry:
    """One specialised graph: its phase and sizes, and the file that holds it."""

    phase: str
    num_tokens: int
    num_seqs: int
    graph: str

    @property
    def bucket(self) -> Bucket:
        return Bucket(self.phase, self.num_tokens, self.num_seqs)


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """manifest.json: what an artifact holds, how it was made, and the sha256 of every file in it."""

    created_by: CreatedBy
    source: Source
    cache_key: str
    options: RequestedOptions
    model: ModelInfo
    target_device: str
    lowering: LoweringRecord
    kv_cache: KVCacheLayout
    tensor_parallel: TensorParallelLayout
    inputs: list[GraphInput]
    passes: list[PassEntry]
    buckets: list[BucketEntry]
    fallback_graph: str
    """The dynamic-shape graph that serves any step no bucket covers."""
    tokenizer: str | None
    chat_template: str | None = None
    """The checkpoint's chat template with its bos/eos strings (artifact/chat_template.py); None: it had none."""
    num_speculative_tokens: int = 0
    """k of the verify buckets (buckets of phase 'verify'), and generate()'s default k; 0: none compiled."""
    quantization: QuantizationRecord | None = None
    """The weight quantization of the linear layers; None: weights in ``model.dtype``."""
    checkpoint_quantization: CheckpointQuantizationRecord | None = None
    """The checkpoint's 4-bit linear layers kept in their integers; None: none (or an artifact written before)."""
    files: dict[str, FileEntry] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {"format_version": data.pop("format_version"), **data}

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """A validated Manifest; ArtifactError names the first missing, mistyped or inconsistent field."""
        if not isinstance(data, dict):
            raise ArtifactError(f"{MANIFEST} must hold a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"{MANIFEST}: format_version {version!r} is not the {FORMAT_VERSION} this runtime reads "
                "(compiled by another xllm_compiler version: recompile it with xllm-compile)"
            )
        manifest = decode(cls, data, "")
        manifest.check()
        return manifest

    def check(self) -> None:
        """What the fields must agree on beyond their types."""
        if self.model.dtype not in MODEL_DTYPES:
            _fail("model.dtype", f"must be one of {', '.join(MODEL_DTYPES)}, got {self.model.dtype!r}")
        for path, value in (
            ("model.vocab_size", self.model.vocab_size),
            ("model.num_layers", self.model.num_layers),
            ("model.num_kv_heads", self.model.num_kv_heads),
            ("model.head_dim", self.model.head_dim),
            ("model.max_seq_len", self.model.max_seq_len),
            ("kv_cache.block_size", self.kv_cache.block_size),
            ("tensor_parallel.size", self.tensor_parallel.size),
            ("tensor_parallel.expert_parallel", self.tensor_parallel.expert_parallel),
        ):
            if value < 1:
                _fail(path, f"must be positive, got {value}")
        if self.kv_cache.reserved_blocks < 0:
            _fail("kv_cache.reserved_blocks", f"must not be negative, got {self.kv_cache.reserved_blocks}")
        if len(self.tensor_parallel.weights) != self.tensor_parallel.size:
            _fail("tensor_parallel.weights", f"must name one file per rank ({self.tensor_parallel.size})")
        if self.inputs != calling_convention():
            _fail("inputs", "are not the calling convention this runtime feeds (recompile the artifact)")
        for i, bucket in enumerate(self.buckets):
            if bucket.phase not in (DECODE, PREFILL, VERIFY):
                _fail(f"buckets[{i}].phase", f"must be {DECODE!r}, {PREFILL!r} or {VERIFY!r}, got {bucket.phase!r}")
            if bucket.num_tokens < 1 or bucket.num_seqs < 1:
                _fail(f"buckets[{i}]", "sizes must be positive")
        names = [b.bucket.name for b in self.buckets]
        if len(set(names)) != len(names):
            _fail("buckets", "list a bucket twice")
        if not self.files:
            _fail("files", "lists no files")
        read = [
            ("tensor_parallel.weights", *self.tensor_parallel.weights),
            ("fallback_graph", self.fallback_graph),
            *((f"buckets[{i}].graph", b.graph) for i, b in enumerate(self.buckets)),
            *([("tokenizer", self.tokenizer)] if self.tokenizer is not None else []),
            *([("chat_template", self.chat_template)] if self.chat_template is not None else []),
        ]
        for path, *rels in read:
            for rel in rels:
                if rel not in self.files:
                    _fail(path, f"names '{rel}', which the 'files' list does not cover")

    @property
    def weight_bytes(self) -> int:
        """Bytes of one rank's weights file (every rank's is about the same size)."""
        return self.files[self.tensor_parallel.weights[0]].bytes

    def graph_files(self) -> dict[str, str]:
        """Every graph the runtime loads, by name: each bucket's, and 'dynamic' for the fallback."""
        return {FALLBACK_GRAPH: self.fallback_graph, **{b.bucket.name: b.graph for b in self.buckets}}


def calling_convention() -> list[GraphInput]:
    """The inputs this project's graphs take (xllm_compiler.interface.STEP_INPUTS), as the manifest records them."""
    return [GraphInput(s.name, dtype_name(s.dtype), list(s.shape)) for s in STEP_INPUTS]


def _fail(path: str, problem: str) -> typing.NoReturn:
    raise ArtifactError(f"{MANIFEST}: {path} {problem}")


def _describe(annotation: Any) -> str:
    names = {int: "an integer", str: "a string", bool: "true or false", float: "a number", type(None): "null"}
    if annotation in names:
        return names[annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(annotation):
        return "an object"
    return str(annotation)


def decode(annotation: Any, value: Any, path: str) -> Any:
    """``value`` (parsed JSON) as ``annotation`` (a record, a list, a dict, a scalar or a union of
    them); ArtifactError names ``path`` when it does not fit."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return decode(option, value, path)
            except ArtifactError:
                continue
        _fail(path, f"must be {_describe(annotation)}, got {value!r}")
    if isinstance(annotation, type) and annotation in _FIELD_TYPES:  # one of the records above
        if not isinstance(value, dict):
            _fail(path or "the manifest", f"must be an object, got {value!r}")
        hints = _FIELD_TYPES[annotation]
        kwargs = {}
        for f in dataclasses.fields(annotation):
            where = f"{path}.{f.name}" if path else f.name
            if f.name in value:
                kwargs[f.name] = decode(hints[f.name], value[f.name], where)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                _fail(where, "is missing")
            # else: an optional field added after the artifact was written, whose default says "not used"
        return annotation(**kwargs)
    if origin is list:
        if not isinstance(value, list):
            _fail(path, f"must be a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [decode(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(path, f"must be an object, got {value!r}")
        _, item = typing.get_args(annotation)
        return {k: decode(item, v, f"{path}['{k}']") for k, v in value.items()}
    if annotation is type(None):
        if value is not None:
            _fail(path, f"must be null, got {value!r}")
        return None
    # bool is an int in Python, and an int is not a float in JSON's sense here: match exactly.
    if type(value) is not annotation:
        _fail(path, f"must be {_describe(annotation)}, got {value!r}")
    return value


#: Each record's field types, resolved here at import: resolving string annotations evaluates them,
#: and loading an artifact evaluates nothing (tests/test_artifact_integrity.py checks it).
_FIELD_TYPES: dict[type, dict[str, Any]] = {
    record: typing.get_type_hints(record)
    for record in (
        CreatedBy,
        Source,
        RequestedOptions,
        ModelInfo,
        KVCacheLayout,
        TensorParallelLayout,
        LoweringRecord,
        QuantizationRecord,
        CheckpointQuantizationRecord,
        GraphInput,
        PassEntry,
        BucketEntry,
        FileEntry,
        Manifest,
    )
}

__all__ = [
    "FALLBACK_GRAPH",
    "FORMAT_VERSION",
    "MANIFEST",
    "BucketEntry",
    "CheckpointQuantizationRecord",
    "CreatedBy",
    "FileEntry",
    "GraphInput",
    "KVCacheLayout",
    "LoweringRecord",
    "Manifest",
    "ModelInfo",
    "PassEntry",
    "QuantizationRecord",
    "RequestedOptions",
    "Source",
    "TensorParallelLayout",
    "calling_convention",
    "decode",
]
