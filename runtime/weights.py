"""An artifact's weights read one tensor at a time, each turned by the platform into what its graphs use.

Why one at a time: reading the whole file first (safetensors' ``load_file``: views of one memory map of
it) and packing afterwards held every page of the file resident beside the packed copies, 2.3x the
weights at the peak for a Llama-3.2-1B in bfloat16. Here each tensor is handed to the platform's hook
(CPU packs linear weights) as it is read, and the file pages of a tensor the hook did not keep are given
back at once (``madvise(MADV_DONTNEED)``): the peak is what the graphs will use plus one tensor.

Why the map and not a read into memory of our own (safetensors' ``pread`` backend, the same peak): the
map reads a page of the page cache by mapping it, a read copies it into a freshly zeroed page; on the
1B model the read and pack took 2.1-2.4 s with ``pread`` and 0.8-1.7 s through the map. Giving pages
back is safe whatever still points at them: the map is never written, so a page touched again is read
back from the file.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

#: The platform's per-tensor hook: a tensor as read -> the tensors the lowered graphs use in its place
#: (itself, a packed copy, both, or none), by name.
PrepareWeight = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


def read_weights(path: Path, device: torch.device, prepare: PrepareWeight | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path`` on ``device``, passed through ``prepare`` as it is read
    (raises safetensors' SafetensorError or OSError on an unreadable file, as ``load_file`` does)."""
    weights: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as file:
        for name in file.keys():  # noqa: SIM118  (safe_open is no mapping: keys() is its listing)
            tensor = file.get_tensor(name)
            prepared = prepare(name, tensor) if prepare is not None else {name: tensor}
            if not any(_overlap(kept, tensor) for kept in prepared.values()):
                _release_pages(tensor)
            weights.update(prepared)
    return weights


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors share memory (a kept view of a tensor keeps its pages)."""
    return a.device == b.device and a.data_ptr() < b.data_ptr() + b.nbytes and b.data_ptr() < a.data_ptr() + a.nbytes


@functools.cache
def _madvise() -> Callable[..., int] | None:
    """libc's madvise, where there is one (not on Windows: there pages stay until the map closes)."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        return ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return None


def _release_pages(tensor: torch.Tensor) -> None:
    """Take the whole pages of the file map under ``tensor`` out of the resident set (a CPU tensor only:
    on another device it is a copy). Best effort: where madvise fails they stay until the map closes."""
    madvise = _madvise()
    if madvise is None or tensor.device.type != "cpu":
        return
    start = -(-tensor.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (tensor.data_ptr() + tensor.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:  # pages shared with a neighbour are left to it
        madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)
