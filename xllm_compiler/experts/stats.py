"""STATS.json, what ``xllm-run --expert-stats`` writes: read, validate, and check against a model.

    {"layers": [[tokens routed to each expert] per MoE layer], "tokens": N}

Every problem is an OptionsError naming the file and what is wrong with it (exit 2 in the CLI).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

from xllm_compiler.errors import OptionsError


@dataclass(frozen=True)
class ExpertStats:
    layers: list[list[int]]
    tokens: int

    def check_model(self, path: Path, moe_layers: int, num_experts: int) -> None:
        """Refuse stats measured on another model: other MoE layer or expert counts."""
        if len(self.layers) != moe_layers:
            raise OptionsError(
                f"{path}: {len(self.layers)} layers of counts, but the model has {moe_layers} MoE layers"
            )
        for i, layer in enumerate(self.layers):
            if len(layer) != num_experts:
                raise OptionsError(f"{path}: layer {i} counts {len(layer)} experts, but the model has {num_experts}")


def read_stats(path: Path) -> ExpertStats:
    """The stats in ``path``, validated (non-negative integer counts, one list per layer)."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise OptionsError(f"--expert-placement {path} cannot be read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OptionsError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("layers"), list) or not data["layers"]:
        raise OptionsError(f'{path} must hold {{"layers": [[count per expert] per MoE layer], "tokens": N}}')
    tokens = data.get("tokens")
    if not _count(tokens):
        raise OptionsError(f"{path}: 'tokens' must be a non-negative integer, got {tokens!r}")
    for i, layer in enumerate(data["layers"]):
        if not isinstance(layer, list) or not layer:
            raise OptionsError(f"{path}: layer {i} must be a list of counts, got {layer!r}")
        bad = [c for c in layer if not _count(c)]
        if bad:
            raise OptionsError(f"{path}: layer {i} holds {bad[0]!r}, not a non-negative integer count")
    return ExpertStats([list(layer) for layer in data["layers"]], tokens)


def _count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
