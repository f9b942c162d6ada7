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

The recorded calls then become a native ``ReplayProgram`` (ops/cpu_replay.cpp) where the kernels are
built: a step is one call from Python, which runs our kernels directly, ATen ops through the dispatcher
(or, where NATIVE_OPS has a kernel that does the same work on the call's arguments, that kernel) and only
what is neither (a Python function) through Python. The graph's outputs are the items of its output tuple,
those the program recomputes taken from its run. Its arguments were converted once; from the
Python loop each call cost about 1.5 us before its kernel began. A graph the program cannot take (a
register nested deeper than a list's items, or inside a list given to a Python function) replays from
the Python loop, as it does without the kernels.

A graph with another kind of node (call_module, call_method) is run by its module, as the fallback is.
Measured on the ~100M Llama at batch 1 (Zen 4, 2 threads): see docs/performance.md.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import fx

from xllm_compiler.ops.attention import paged_attention_out_kernel
from xllm_compiler.ops.native import native_kernels
from xllm_compiler.runtime.platform.shape_ops import TENSOR_METHODS
from xllm_compiler.runtime.replay import StaticInputs

#: Ops that only make views: computed once, at capture, when they read fixed tensors.
SHAPE_OPS = frozenset({*TENSOR_METHODS.values(), operator.getitem})
RECORDABLE = frozenset({"placeholder", "get_attr", "call_function", "output"})
#: Python kernels whose work a native kernel does when it can: it returns False where it declines the call
#: (paged_decode_out on a step that is not all decode), and the Python kernel then runs.
NATIVE_FIRST = {paged_attention_out_kernel: "paged_decode_out"}


def _select_rows(args: tuple, kwargs: dict[str, Any]) -> tuple | None:
    """select_rows_out's arguments for ``aten.index_select.out(table, 0, index, out=out)`` where it takes them: a
    [rows, width] table with dense rows, a 1-d int64 index, a contiguous out of the table's dtype."""
    if len(args) != 3 or set(kwargs) != {"out"} or args[1] != 0:
        return None
    (table, _, index), out = args, kwargs["out"]
    rows_ok = table.dim() == 2 and table.stride(1) == 1
    index_ok = index.dim() == 1 and index.dtype == torch.int64 and index.is_contiguous()
    out_ok = out.is_contiguous() and out.dtype == table.dtype and out.shape == (index.numel(), table.shape[1])
    return (table, index, out) if rows_ok and index_ok and out_ok else None


#: ATen ops a native kernel runs as well where its arguments suit it (the function says, giving the kernel's
#: arguments): the dispatcher's own cost is most of these small calls' time at batch 1.
NATIVE_OPS = {torch.ops.aten.index_select.out: ("select_rows_out", _select_rows)}


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

    def __init__(self, module: fx.GraphModule, native: bool = True):
        """``native``: replay through a native ReplayProgram where the kernels are built (else the Python loop)."""
        self.module = module
        self.inputs: StaticInputs | None = None
        self.calls: list[Call] = []
        self.program = None  # the native ReplayProgram, once captured, where it takes every call
        self._native = native
        self._registers: list[Any] = []
        self._outputs: Any = None
        self._output_positions: list[int] = []  # the program's outputs: the items of the graph's output tuple
        self.recordable = all(node.op in RECORDABLE for node in module.graph.nodes)

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.recordable:
            return self.module(*args)
        if self.inputs is None:
            return self._capture(args)
        self.inputs.copy_in(args)
        if self.program is not None:
            outputs = list(self._outputs)  # the KV cache layers among them, as they are
            for position, value in zip(self._output_positions, self.program.run(), strict=True):
                outputs[position] = value
            return tuple(outputs)
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
        if self._native:
            self.program = self._native_program()
        return _fill(self._outputs, self._registers)

    def _native_program(self) -> Any:
        """The recorded calls as a native ReplayProgram, or None where the kernels are not built, a call reads a
        register the program cannot place (see the module docstring) or one is nested in the graph's outputs."""
        native = native_kernels()
        outputs = self._outputs if isinstance(self._outputs, (tuple, list)) else ()
        self._output_positions = [i for i, value in enumerate(outputs) if isinstance(value, Register)]
        if native is None or len(self._output_positions) != len(_registers_in(self._outputs)):
            return None
        program, kernels = native.ReplayProgram(), frozenset(native.replay_kernels())
        for call in self.calls:
            if not _add_call(program, call, self._registers, native, kernels):
                return None
        for index, value in enumerate(self._registers):
            program.set_register(index, value)
        program.set_outputs([outputs[i].index for i in self._output_positions])
        return program

    def _record(self, node: fx.Node, values: dict[fx.Node, Any]) -> Any:
        """Run ``node`` on the values so far; what later nodes read of it (a value, or a Register)."""
        args = fx.node.map_arg(node.args, values.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
        reads_registers = bool(_registers_in(args) or _registers_in(kwargs))
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


def _add_call(program: Any, call: Call, registers: list[Any], native: Any, kernels: frozenset[str]) -> bool:
    """Add ``call`` to ``program``; False where it cannot be added (then no program is used)."""
    target, args, kwargs, result = call.target, call.args, call.kwargs, -1 if call.register is None else call.register
    reads = [*_reads(enumerate(args)), *_reads(kwargs.items())]
    if len(_registers_in((args, kwargs))) > len(reads):
        return False  # a register deeper than a list argument's items
    filled_args, filled_kwargs = _fill(args, registers), _fill(kwargs, registers)
    if target in NATIVE_FIRST and not reads:
        bound = inspect.signature(target).bind(*filled_args, **filled_kwargs)
        bound.apply_defaults()
        program.add_kernel(NATIVE_FIRST[target], tuple(bound.arguments.values()), {}, [], result, target)
    elif (native_op := _native_op(call, reads, filled_args, filled_kwargs, kernels)) is not None:
        program.add_kernel(*native_op, {}, [], result, None)
    elif getattr(target, "__module__", None) == native.__name__ and target.__name__ in kernels:
        program.add_kernel(target.__name__, filled_args, filled_kwargs, reads, result, None)
    elif isinstance(target, torch._ops.OpOverload):
        program.add_op(target._schema.name, target._schema.overload_name, filled_args, filled_kwargs, reads, result)
    elif target is operator.getitem and isinstance(args[0], Register) and isinstance(args[1], int):
        program.add_getitem(args[0].index, args[1], result)
    elif all(item < 0 for _, item, _ in reads):
        program.add_python(target, filled_args, filled_kwargs, reads, result)
    else:
        return False  # a Python function reading a register inside a list
    return True


def _native_op(call: Call, reads: list, args: tuple, kwargs: dict[str, Any], kernels: frozenset[str]) -> tuple | None:
    """(kernel name, its arguments) where NATIVE_OPS runs ``call``, an op that reads no register and whose result
    is one of its own arguments (the kernel returns nothing); else None."""
    name, arguments = NATIVE_OPS.get(call.target, (None, None))
    if name not in kernels or reads or call.register is not None:
        return None
    given = arguments(args, kwargs)
    return None if given is None else (name, given)


def _reads(arguments: Any) -> list[tuple[int | str, int, int]]:
    """(position or keyword, list item or -1, register) of each argument, or list item, that is a register."""
    reads = []
    for key, value in arguments:
        if isinstance(value, Register):
            reads.append((key, -1, value.index))
        elif isinstance(value, (list, tuple)):
            reads += [(key, item, v.index) for item, v in enumerate(value) if isinstance(v, Register)]
    return reads


def _registers_in(value: Any) -> list[Register]:
    if isinstance(value, Register):
        return [value]
    if isinstance(value, (list, tuple)):
        return [r for item in value for r in _registers_in(item)]
    if isinstance(value, dict):
        return [r for item in value.values() for r in _registers_in(item)]
    return []


def _fetch(module: torch.nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


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
