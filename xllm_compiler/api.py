"""The public Python API: ``compile``, ``load`` and ``export_onnx``, thin layers over the compiler and the runtime."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xllm_compiler.runtime import CompiledModel
from xllm_compiler.runtime import load as _load


def compile(
    model_dir: str | Path, out_dir: str | Path, extra_passes: Sequence[Any] = (), **options: Any
) -> dict[str, Any]:
    """Compile the checkpoint in ``model_dir`` into the artifact ``out_dir``; returns the report.

    Keywords mirror the CLI: ``dtype``, ``device``, ``decode_buckets``, ``prefill_buckets``,
    ``max_seq_len``, ``force``, ``passes``, ``disable_passes``, ``verify``, ``block_size``,
    ``debug_dump``. ``extra_passes`` (GraphPass objects) run after the pipeline and are recorded in the
    report and manifest like the others. Raises ``xllm_compiler.errors.InputError`` (a ValueError) for
    bad input, where the CLI exits 2.
    """
    from xllm_compiler.compiler import compile_model  # imports models/ and passes/: only when compiling
    from xllm_compiler.options import make_options

    return compile_model(model_dir, out_dir, make_options(**options), extra_passes=list(extra_passes))


def load(
    out_dir: str | Path,
    device: str | None = None,
    kv_blocks: int | None = None,
    max_resident_graphs: int | None = None,
    max_memory_utilization: float | None = None,
) -> CompiledModel:
    """Load a compiled artifact; see ``xllm_compiler.runtime.load``."""
    return _load(
        out_dir,
        device=device,
        kv_blocks=kv_blocks,
        max_resident_graphs=max_resident_graphs,
        max_memory_utilization=max_memory_utilization,
    )


def export_onnx(out_dir: str | Path, path: str | Path, phase: str, num_tokens: int) -> Path:
    """Write the ``phase`` ("decode" or "prefill") bucket of ``num_tokens`` tokens of the artifact ``out_dir``
    as the ONNX model ``path``, KV caches as explicit inputs and outputs; see ``xllm_compiler.onnx``.
    Needs the ``onnx`` extra; raises ``OptionsError`` for a bucket the artifact does not have."""
    from xllm_compiler.onnx import export_onnx as _export  # imports onnx/onnxscript: only when exporting

    return _export(out_dir, path, phase, num_tokens)
