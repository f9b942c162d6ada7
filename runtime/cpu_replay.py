"""CPU graph replay: a bucket graph's calls recorded once, their arguments resolved, and replayed as a list.

A CPU kernel is a plain function call, so there is no launch to capture as a CUDA graph does. What a
small decode step spends outside its kernels is the generated forward's Python: one attribute fetch per
weight and arena buffer, and a view, split, getitem or unsqueeze between the kernels, a few per layer.
Every tensor a bucket graph touches keeps its address (runtime/replay.py says where each comes from),
so every such shape op gives the same view at every step. They are computed once, at capture, and a
replay is only the calls that do work, each with its arguments already in hand.

The capture is the first step itself, run node by node. Each call_function node becomes one of:
- a **shape op** (SHAPE_OPS) of fixed tensors whose result aliases its input: computed now, kept;
- a **call** replayed at every step. Its result is kept fixed when it is one of its own tensor
  arguments (an out= or in-place op returns what it wrote). Otherwise, if later nodes read it, a
  *register* holds it: the value is recomputed at every replay. The LM head's logits are one such
  value. A shape op of a register's value is replayed too.

A graph with another kind of node (call_module, call_method) is run by its module, as the fallback is.
Measured on the ~100M Llama at batch 1 (Zen 4, 2 threads): see docs/performance.md.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import fx

from xllm_compiler.runtime.platform.shape_ops import TENSOR_METHODS
from xllm_compiler.runtime.replay import StaticInputs

#: Ops that only make views: computed once, at capture, when they read fixed tensors.
SHAPE_OPS = frozenset({*TENSOR_METHODS.values(), operator.getitem})
RECORDABLE = frozenset({"placeholder", "get_attr", "call_function", "output"})


class Register(NamedTuple):
    """A value recomputed at each replay: the result of ``CpuGraphRunner``'s call that fills slot ``index``."""

    index: int


class Call(NamedTuple):
    target: Callable[..., Any]
    args: tuple
    kwargs: dict[str, Any]
    register: int | None  # the slot its result goes to, where later calls or the output read it
    reads_registers: bool


class CpuGraphRunner:
    """One bucket graph, recorded on its first call (which is a real step) and replayed on the later ones.

    Replayed calls read the step inputs from ``StaticInputs``' buffers, so the first call's inputs fix
    the shapes (a bucket's inputs are padded to it) and the KV cache layers must not move.
    """

    def __init__(self, module: fx.GraphModule):
        self.module = module
        self.inputs: StaticInputs | None = None
        self.calls: list[Call] = []
        self._registers: list[Any] = []
        self._outputs: Any = None
        self.recordable = all(node.op in RECORDABLE for node in module.graph.nodes)

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.recordable:
            return self.module(*args)
        if self.inputs is None:
            return self._capture(args)
        self.inputs.copy_in(args)
        registers = self._registers
        for target, call_args, call_kwargs, register, reads_registers in self.calls:
            if reads_registers:
                call_args, call_kwargs = _fill(call_args, registers), _fill(call_kwargs, registers)
            result = target(*call_args, **call_kwargs)
            if register is not None:
                registers[register] = result
        return _fill(self._outputs, registers)  # what the module returns

    def _capture(self, args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        # Outside inference mode, so that the buffers and views kept here are normal tensors: a later
        # step may run with or without it, and an inference tensor cannot be written outside it.
        with torch.inference_mode(False):
            inputs = StaticInputs(args)
            placeholders = iter(inputs.copy_in(args))
            values: dict[fx.Node, Any] = {}
            for node in self.module.graph.nodes:
                if node.op == "placeholder":
                    values[node] = next(placeholders)
                elif node.op == "get_attr":
                    values[node] = _fetch(self.module, node.target)
                elif node.op == "call_function":
                    values[node] = self._record(node, values)
                else:
                    self._outputs = fx.node.map_arg(node.args[0], values.__getitem__)
        self.inputs = inputs
        return _fill(self._outputs, self._registers)

    def _record(self, node: fx.Node, values: dict[fx.Node, Any]) -> Any:
        """Run ``node`` on the values so far; what later nodes read of it (a value, or a Register)."""
        args = fx.node.map_arg(node.args, values.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
        reads_registers = _holds_register(args) or _holds_register(kwargs)
        result = node.target(*_fill(args, self._registers), **_fill(kwargs, self._registers))
        if node.target in SHAPE_OPS and not reads_registers and _aliases(result, args[0]):
            return result
        fixed = not reads_registers and _returns_an_argument(result, args, kwargs)
        register = None
        if node.users and not fixed:
            register = len(self._registers)
            self._registers.append(result)
        self.calls.append(Call(node.target, args, kwargs, register, reads_registers))
        return result if register is None else Register(register)


def _fetch(module: torch.nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _holds_register(value: Any) -> bool:
    if isinstance(value, Register):
        return True
    if isinstance(value, (list, tuple)):
        return any(map(_holds_register, value))
    if isinstance(value, dict):
        return any(map(_holds_register, value.values()))
    return False


def _fill(value: Any, registers: list[Any]) -> Any:
    """``value`` with each Register replaced by the register's current value."""
    if isinstance(value, Register):
        return registers[value.index]
    if isinstance(value, (list, tuple)):
        return type(value)(_fill(item, registers) for item in value)
    if isinstance(value, dict):
        return {key: _fill(item, registers) for key, item in value.items()}
    return value


def _aliases(result: Any, source: Any) -> bool:
    """Whether a shape op's ``result`` only views ``source`` (a reshape may copy; a getitem picks an item)."""
    if not isinstance(source, torch.Tensor):
        return True
    results = result if isinstance(result, (list, tuple)) else (result,)
    storage = source.untyped_storage().data_ptr()
    return all(isinstance(r, torch.Tensor) and r.untyped_storage().data_ptr() == storage for r in results)


def _returns_an_argument(result: Any, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether ``result`` is (or is a tuple made only of) tensors the call was given: what it wrote into."""
    given = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
    results = result if isinstance(result, (list, tuple)) else (result,)
    return bool(results) and all(any(r is g for g in given) for r in results)
