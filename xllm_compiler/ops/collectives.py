"""Collectives as graph ops: torch's functional collectives, so that passes can see and move them.

``all_reduce`` issues ``_c10d_functional.all_reduce`` and waits with ``wait_tensor``: two nodes, the
issue and the wait, which the overlap passes pull apart. The group is named by a string traced into
the graph; the runtime binds it to the real process group when it loads a tensor-parallel artifact.
"""

from __future__ import annotations

import torch

funcol = torch.ops._c10d_functional


def all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum of ``x`` over the group's ranks."""
    return funcol.wait_tensor.default(funcol.all_reduce.default(x, "sum", group_name))
