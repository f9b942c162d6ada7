"""Graph replay: a bucket graph captured once on the device (CUDA graphs, torchair's aclgraph) and replayed.

A step of a small decode batch launches hundreds of small kernels; launched one by one from Python, the
launches, not the kernels, set the pace. Captured once and replayed, a whole step is one launch. A
bucket's shapes are static (its inputs are padded to the bucket), so one capture serves every step
that the bucket takes; the dynamic fallback graph is never captured.

What capture needs from a graph, and where it comes from:
- no op reads a device value back to the host (attention metadata are graph inputs prepared on the host);
- every tensor the graph reads or writes keeps its address: weights and the KV cache are allocated once,
  planned intermediates are views of the one activation arena, and the per-step inputs are copied into
  buffers allocated once (``StaticInputs`` for CUDA; torchair's own input copies on NPU).

A runner's outputs are the captured graph's own tensors, overwritten by its next replay: the caller
consumes them before the next step (``Engine.step`` copies the logits to the host). Eager execution,
what CPU uses, is the GraphModule itself: it is called the same way.

``XLLM_GRAPH_REPLAY=0`` turns replay off on every device (each graph then runs eagerly): to tell a
capture problem from a graph problem.

Could not run here: this project's machines have no GPU and no NPU. ``CudaGraphRunner`` follows
torch.cuda's graph API (torch 2.13) and ``TorchairRunner`` torch_npu 2.13.0's npugraph_ex backend, and
tests/runtime/test_graph_replay.py checks both against eager logits where the device exists (markers
``gpu``, ``npu``); no replay result is claimed until those tests have run on one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from torch import fx

from xllm_compiler.interface import STEP_INPUTS

if TYPE_CHECKING:
    from xllm_compiler.runtime.platform.base import Platform

#: Eager runs on a side stream before a capture, as torch's CUDA graph notes advise: lazy initialisation
#: (cuBLAS handles and workspaces, first-call kernel setup) must happen outside the capture.
WARMUP_RUNS = 3


class GraphRunner(Protocol):
    """Runs one graph on a step's inputs (the STEP_INPUTS, then the KV cache layers)."""

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]: ...


#: Turns a built bucket graph into its runner; a platform that replays graphs provides one.
RunnerFactory = Callable[[fx.GraphModule], GraphRunner]


def replay_enabled() -> bool:
    """Whether graph replay may be used (``XLLM_GRAPH_REPLAY=0`` says no)."""
    return os.environ.get("XLLM_GRAPH_REPLAY", "1") != "0"


def runner_factory(platform: Platform) -> RunnerFactory | None:
    """How ``platform`` runs bucket graphs: its replay, or None (eagerly) where it has none or it is off."""
    return platform.graph_runner() if replay_enabled() else None


class StaticInputs:
    """Fixed-address copies of a graph's per-step inputs, for a graph that is captured once and replayed.

    A captured graph reads its inputs from the addresses it saw when it was captured. The step inputs
    (token ids, positions, attention metadata) are built anew every step, so they are copied into buffers
    allocated here once. The KV cache layers that follow are allocated once by the runtime and passed as
    they are; one that has moved is refused, because a replay would still write to its old address.
    """

    def __init__(self, example: Sequence[torch.Tensor], num_copied: int = len(STEP_INPUTS)):
        self.buffers = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in example[:num_copied]]
        self._fixed = [t.data_ptr() for t in example[num_copied:]]
        self.args = (*self.buffers, *example[num_copied:])

    def copy_in(self, args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Copy this step's inputs into the buffers; the arguments to call the captured graph with."""
        if len(args) != len(self.args):
            raise ValueError(f"a captured graph takes {len(self.args)} inputs, got {len(args)}")
        copied, fixed = args[: len(self.buffers)], args[len(self.buffers) :]
        for i, (buffer, arg) in enumerate(zip(self.buffers, copied, strict=True)):
            if arg.shape != buffer.shape or arg.dtype != buffer.dtype:
                raise ValueError(
                    f"input {i} of a captured graph is {arg.dtype} {list(arg.shape)}, it was captured with "
                    f"{buffer.dtype} {list(buffer.shape)}"
                )
            buffer.copy_(arg, non_blocking=True)
        for i, (address, arg) in enumerate(zip(self._fixed, fixed, strict=True), start=len(self.buffers)):
            if arg.data_ptr() != address:
                raise ValueError(f"input {i} of a captured graph moved since the capture (it must keep its address)")
        return self.args


class CudaGraphRunner:
    """One bucket graph, captured as a CUDA graph on its first call and replayed on every later call.

    The first call copies its inputs into ``StaticInputs``, runs the graph eagerly on a side stream
    (``WARMUP_RUNS``), captures it into ``pool`` and replays it. The eager runs are real steps on the same
    inputs: they write the same K/V to the same slots, so running them is harmless. Graphs share one
    private pool because they run one at a time on one stream; each runner keeps its outputs alive, so
    no capture reuses another graph's outputs.

    Could not run here (no GPU): written to torch.cuda's documented API (torch.cuda.CUDAGraph,
    torch.cuda.graph(graph, pool=...), CUDAGraph.replay) and checked only by the ``gpu`` tests.
    """

    def __init__(self, module: fx.GraphModule, pool: torch.cuda._POOL_HANDLE):  # what graph_pool_handle() returns
        self.module = module
        self._pool = pool
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: StaticInputs | None = None
        self._outputs: tuple[torch.Tensor, ...] = ()

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._graph is None or self._inputs is None:
            return self._capture(args)
        self._inputs.copy_in(args)
        self._graph.replay()
        return self._outputs

    def _capture(self, args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        self._inputs = StaticInputs(args)
        static = self._inputs.copy_in(args)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.module(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._outputs = tuple(self.module(*static))
        self._graph = graph
        graph.replay()
        return self._outputs


def cuda_graph_runners() -> RunnerFactory:
    """CUDA's runner factory: every bucket graph of one model captured into one private memory pool."""
    pool = torch.cuda.graph_pool_handle()
    return lambda module: CudaGraphRunner(module, pool)


class TorchairRunner:
    """One bucket graph compiled by torch_npu's torchair (npugraph_ex backend): captured as an aclgraph on
    its first call, replayed on later calls.

    torch_npu registers the dynamo backend "npugraph_ex" (entry point ``torch_dynamo_backends`` in its
    dist-info, torch_npu/dynamo/__init__.py); ``torch.compile(..., options=...)`` hands the options to it,
    and npugraph_ex's ``_process_kwargs_options`` refuses any its ``CompilerConfig`` lacks
    (torch_npu/dynamo/npugraph_ex/configs/compiler_config.py; ``frozen_parameter`` was checked there):

    - ``frozen_parameter``: "Parameters and input tensors with immutable data_ptr marked by
      torch._dynamo.mark_static_address() will be considered static" (npugraph_ex's fx2acl_converter.py):
      read at their captured address, never copied. The weights and the arena views are module buffers,
      not parameters, so each is marked here.
    - ``clone_input`` stays at its default (True): torchair copies each user input into its captured
      buffers before a replay, what ``StaticInputs`` does on CUDA. The KV cache layers are inputs the
      graph mutates: torchair passes them uncopied and records their addresses, recapturing if one
      moves (npugraph_ex's acl_graph.py, ``captured_mutated_inputs``).

    Each bucket graph is compiled with ``dynamic=False``: the buckets are xLLM's gears already, so
    torchair's ``set_dim_gears`` (dynamic dims in its max-autotune/GE mode) is not needed.

    Could not run here (no NPU, no CANN): these calls follow torch_npu 2.13.0's sources only and are
    checked by the ``npu`` tests. ``backend`` names the dynamo backend; on CPU the tests pass dynamo's
    "eager" one, which checks the whole-graph trace (no graph break) that torchair compiles.
    """

    def __init__(self, module: fx.GraphModule, backend: str = "npugraph_ex"):
        for tensor in module.buffers():
            torch._dynamo.mark_static_address(tensor, guard=False)
        self._compiled = torch.compile(
            module, backend=backend, fullgraph=True, dynamic=False, options={"frozen_parameter": True}
        )

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._compiled(*args)
