"""Sizes in a bucket-specialised graph: every shape is still written with the capture's symbols, and
``gm.meta["sizes"]`` says what they are in this bucket. Comm and memory passes both need the ints.
"""

from __future__ import annotations

from typing import Any

import sympy
import torch
from torch import fx


def bucket_substitutions(gm: fx.GraphModule) -> dict[sympy.Symbol, int]:
    """symbol -> its size in this bucket (empty for a graph that is not specialised)."""
    symbols = gm.meta.get("symbols", {})
    return {symbols[name]: size for name, size in gm.meta.get("sizes", {}).items() if name in symbols}


def concrete(size: Any, subs: dict[sympy.Symbol, int]) -> int:
    """``size`` (an int, SymInt or sympy expression) as an int under ``subs``; ValueError if it stays symbolic."""
    if isinstance(size, int):
        return size
    expr = size.node.expr if isinstance(size, torch.SymInt) else sympy.sympify(size)
    value = expr.subs(subs)
    if not value.is_Integer:
        raise ValueError(f"size {size} is not concrete for this bucket")
    return int(value)
