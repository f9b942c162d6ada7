"""The one dtype table: the names artifacts, config.json and the CLI use for torch dtypes.

Names are torch's own (``torch.bfloat16`` is "bfloat16"), so a name read from any of them means the
same dtype everywhere. ``MODEL_DTYPES`` are those a model's weights and activations may have.
"""

from __future__ import annotations

import torch

#: Every dtype an artifact may store (graph values, weights, arena buffers), by name.
DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}
#: The dtypes a model may be compiled in.
MODEL_DTYPES: dict[str, torch.dtype] = {name: DTYPES[name] for name in ("float32", "float16", "bfloat16")}


def dtype_name(dtype: torch.dtype) -> str:
    """``dtype``'s name in DTYPES; KeyError names a dtype no artifact can hold."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise KeyError(f"dtype {dtype} has no name in xllm_compiler.dtypes.DTYPES")
    return name
