"""Byte counts as people read and write them: "3.0 GiB" out, "10G" / "500M" / "1.5GiB" in; powers of 1024."""

from __future__ import annotations

import re

from xllm_compiler.errors import OptionsError

UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
_MULTIPLIERS = {suffix[0]: size for suffix, size in UNITS}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:i?B)?|B)?", re.IGNORECASE)


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest unit that keeps a leading digit: 12.3 GiB, 45.6 MiB, 512 bytes."""
    for suffix, size in UNITS:
        if abs(n) >= size:
            return f"{n / size:.1f} {suffix}"
    return f"{int(n)} bytes"


def parse_size(text: str, name: str) -> int:
    """Bytes from ``10G``, ``500M``, ``1.5GiB`` or ``123456``; ``name`` is the option or variable the
    text came from, for the error."""
    match = _SIZE.fullmatch(text.strip())
    size = int(float(match[1]) * _MULTIPLIERS.get((match[2] or "").upper(), 1)) if match else 0
    if size <= 0:
        raise OptionsError(f"{name}={text!r} is not a size: give bytes or a number with K, M, G or T, e.g. 10G")
    return size
