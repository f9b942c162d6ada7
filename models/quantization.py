"""The quantization a checkpoint declares in config.json's ``quantization_config``, parsed by its format's
module: fp8 blocks (models/fp8.py) or GPTQ / AWQ packed integers (models/int_quant.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

from xllm_compiler.errors import CheckpointError
from xllm_compiler.models.config import read_config
from xllm_compiler.models.fp8 import Fp8Blocks, fp8_blocks
from xllm_compiler.models.int_quant import IntQuant, awq_scheme, gptq_scheme

Quantization: TypeAlias = Fp8Blocks | IntQuant
#: quant_method -> the parser of its quantization_config.
PARSERS: dict[str, Callable[[dict[str, Any]], Quantization]] = {
    "awq": awq_scheme,
    "fp8": fp8_blocks,
    "gptq": gptq_scheme,
}


def checkpoint_quantization(config: dict[str, Any]) -> Quantization | None:
    """The quantization config.json declares, or None for plain weights. Other methods (bitsandbytes,
    compressed-tensors, ...) are refused by name: their tensors would otherwise load as garbage or go missing."""
    quant = config.get("quantization_config")
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise CheckpointError(f"config.json quantization_config must be an object, got {quant!r}")
    method = quant.get("quant_method")
    if not isinstance(method, str) or method not in PARSERS:
        supported = ", ".join(map(repr, PARSERS))
        raise CheckpointError(f"quantization_config quant_method {method!r} is not supported (supported: {supported})")
    return PARSERS[method](quant)


def quantization_of(model_dir: Path) -> Quantization | None:
    """``checkpoint_quantization`` of ``model_dir``'s config.json (None for a folder without one)."""
    if not (Path(model_dir) / "config.json").is_file():
        return None
    return checkpoint_quantization(read_config(model_dir))
