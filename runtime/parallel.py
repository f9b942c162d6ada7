"""Tensor-parallel runs: join the torch.distributed group torchrun set up, bind it into the graphs,
and keep every rank's sampling in step.

Nothing home-made: torchrun launches the ranks and sets RANK/WORLD_SIZE/MASTER_ADDR; this module
initialises the default process group (gloo on CPU, nccl on CUDA, hccl on NPU) with a timeout, so
that a rank that dies makes the others fail with an error instead of hanging.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch
from torch import fx

from xllm_compiler.errors import DeviceError

#: Seconds a collective may wait for the other ranks before the run fails (XLLM_DIST_TIMEOUT).
DEFAULT_TIMEOUT_S = 60.0
BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
TRACED_GROUP = "tp"  # the group name models trace into their collectives


class TensorParallelGroup:
    """This process's rank in a group of ``size`` (size 1: a single-process run, no collectives).
    ``layout`` names the artifact's parallelism in errors (default: tensor-parallel)."""

    def __init__(self, size: int, device: torch.device, layout: str | None = None):
        self.size = size
        self.rank = 0
        self.group_name = ""
        self.layout = layout or f"tensor-parallel (tp={size})"
        if size > 1:
            self._join(device)

    def _join(self, device: torch.device) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
                raise DeviceError(f"this artifact is {self.layout}: run it under torchrun --nproc-per-node {self.size}")
            timeout = timedelta(seconds=float(os.environ.get("XLLM_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
            dist.init_process_group(backend=BACKENDS[device.type], timeout=timeout)
            # Tear the group down before the interpreter does: a backend thread still finishing a
            # collective would otherwise take the interpreter lock mid-shutdown and abort the process.
            atexit.register(dist.destroy_process_group)
        if dist.get_world_size() != self.size:
            raise DeviceError(
                f"this artifact is {self.layout} but the process group has "
                f"{dist.get_world_size()} ranks (use --nproc-per-node {self.size})"
            )
        self.rank = dist.get_rank()
        self.group_name = dist.group.WORLD.group_name

    def bind(self, graphs: dict[str, fx.Graph]) -> None:
        """Point every ``group_name`` argument (functional collectives, fused collective ops) at this
        run's process group."""
        for graph in graphs.values():
            for node in graph.nodes:
                schema = getattr(node.target, "_schema", None)
                if node.op != "call_function" or schema is None:
                    continue
                names = [a.name for a in schema.arguments]
                if "group_name" not in names:
                    continue
                position = names.index("group_name")
                if position < len(node.args) and node.args[position] == TRACED_GROUP:
                    node.args = (*node.args[:position], self.group_name, *node.args[position + 1 :])
                if node.kwargs.get("group_name") == TRACED_GROUP:
                    node.kwargs = {**node.kwargs, "group_name": self.group_name}

    def agree(self, tokens: list[int]) -> list[int]:
        """Rank 0's sampled tokens, on every rank (sampling with temperature must not diverge)."""
        if self.size == 1:
            return tokens
        import torch.distributed as dist

        buffer = torch.tensor(tokens, dtype=torch.int64)
        dist.broadcast(buffer, src=0)
        return buffer.tolist()
