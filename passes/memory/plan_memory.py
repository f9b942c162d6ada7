"""plan_memory: place every intermediate of a bucket graph in one arena, and make ops write there.

Per bucket (after specialisation, so every size is known): liveness gives each storage a byte size
and a lifetime; greedy-by-size (largest first, each at the lowest offset that no overlapping-lifetime
storage occupies) assigns offsets, which is near-optimal on transformer graphs. The plan is reported
against the lower bound (the peak of live bytes over the schedule, at the arena's 64-byte granule)
and the naive sum.

Then each planned op is switched to a form that writes into its arena buffer: ATen's ``out=``
overload, or our ops' ``*_out`` forms (ops/__init__.py OUT_FORMS) where the target platform has a
kernel for that form (``PlanMemoryOptions.out_forms``, from the platform's lowering table: on NPU only
attention's). An op with neither keeps allocating and is counted as unplanned: on a device, its
allocator (the graph pool, under graph replay) owns the result. Buffers are ``get_attr`` nodes named
``arena.<value>``; the runtime binds them to views of the one arena it allocates at load (same
addresses on every call).
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx

from xllm_compiler.dtypes import dtype_name
from xllm_compiler.interface import ARENA_PREFIX
from xllm_compiler.ops import OUT_FORMS
from xllm_compiler.passes.graph_pass import GraphPass, PassResult
from xllm_compiler.passes.memory.liveness import Liveness, Storage

ALIGNMENT = 64


@dataclass(frozen=True)
class Buffer:
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def to_json(self) -> dict[str, Any]:
        return {"offset": self.offset, "shape": list(self.shape), "dtype": dtype_name(self.dtype)}


@dataclass
class MemoryPlan:
    arena_bytes: int
    lower_bound_bytes: int
    naive_bytes: int
    planned_nodes: int
    unplanned_nodes: int
    buffers: dict[str, Buffer] = field(default_factory=dict)
    lifetimes: dict[str, tuple[int, int]] = field(default_factory=dict)  # buffer -> (first, last node index)

    def summary(self) -> dict[str, int]:
        fields = asdict(self)
        return {k: v for k, v in fields.items() if k not in ("buffers", "lifetimes")}

    def to_json(self) -> dict[str, Any]:
        return {**self.summary(), "buffers": {name: b.to_json() for name, b in self.buffers.items()}}


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def greedy_by_size(storages: list[Storage]) -> tuple[dict[Any, int], int]:
    """Offsets for ``storages`` (by key) and the arena size: largest first, lowest free offset."""
    placed: list[tuple[int, int, Storage]] = []  # (offset, end offset, storage)
    offsets: dict[Any, int] = {}
    for storage in sorted(storages, key=lambda s: (-s.nbytes, s.start)):
        size = _align(storage.nbytes)
        busy = sorted(
            (p for p in placed if p[2].start <= storage.end and storage.start <= p[2].end), key=lambda p: p[0]
        )
        offset = 0
        for begin, end, _ in busy:
            if offset + size <= begin:
                break
            offset = max(offset, end)
        placed.append((offset, offset + size, storage))
        offsets[storage.key] = offset
    return offsets, max((end for _, end, _ in placed), default=0)


def _out_overload(target: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """ATen's out= overload of ``target`` with the same leading arguments, if it has one."""
    if target.namespace != "aten":
        return None
    packet = getattr(torch.ops.aten, target._schema.name.split("::")[1])
    base = target._overloadname
    for name in (f"{base}_out", "out"):
        if name in packet.overloads():
            candidate = getattr(packet, name)
            inputs = [a.name for a in target._schema.arguments]
            out_args = [a.name for a in candidate._schema.arguments]
            if out_args[: len(inputs)] == inputs and out_args[len(inputs) :] == ["out"]:
                return candidate
    return None


@dataclass(frozen=True)
class PlanMemoryOptions:
    out_forms: tuple[str, ...] = tuple(sorted(OUT_FORMS))
    """The ``xllm::`` ops (OUT_FORMS keys) that may become their ``*_out`` form: those the target platform
    has a kernel for. The others stay functional, allocating their results."""


def _xllm_out_form(target: Any, out_forms: tuple[str, ...]) -> tuple[torch._ops.OpOverload, tuple[str, ...]] | None:
    if not isinstance(target, torch._ops.OpOverload) or target.name() not in out_forms:
        return None
    name, outs = OUT_FORMS[target.name()]
    return getattr(torch.ops.xllm, name.split("::")[1]).default, outs


def _rewritable(node: fx.Node, liveness: Liveness, out_forms: tuple[str, ...]) -> bool:
    """Whether every storage ``node`` allocates is plannable and the op has a form writing into it."""
    keys = [k for k in liveness.storages if k[0] is node]
    if not keys or any(k in liveness.pinned for k in keys):
        return False
    if _xllm_out_form(node.target, out_forms) is not None:
        return True
    return isinstance(node.target, torch._ops.OpOverload) and len(keys) == 1 and _out_overload(node.target) is not None


class PlanMemory(GraphPass):
    """Plan a bucket graph's activations into one arena (gm.meta['memory_plan'])."""

    name = "plan_memory"
    version = 2  # 2: an xllm op's out form gets the defaults its functional call left out

    def __init__(self, options: PlanMemoryOptions | None = None):
        self.options = options or PlanMemoryOptions()

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        if "memory_plan" in gm.meta:
            return PassResult(changed=False)  # planned already: its buffers are in the graph
        return _plan(gm, self.options.out_forms)


def _plan(gm: fx.GraphModule, out_forms: tuple[str, ...]) -> PassResult:
    liveness = Liveness(gm)
    candidates = {s.key[0] for s in liveness.planned() if s.key[0].op == "call_function"}
    rewritable = {node for node in candidates if _rewritable(node, liveness, out_forms)}
    storages = [s for s in liveness.planned() if s.key[0] in rewritable]
    offsets, arena_bytes = greedy_by_size(storages)
    plan = MemoryPlan(
        arena_bytes=arena_bytes,
        lower_bound_bytes=liveness.lower_bound(storages, ALIGNMENT),
        naive_bytes=sum(_align(s.nbytes) for s in storages),
        planned_nodes=len(rewritable),
        unplanned_nodes=len(candidates - rewritable),
    )
    graph = gm.graph
    first = next(iter(graph.nodes))
    buffers: dict[Any, fx.Node] = {}
    arena = torch.nn.Module()  # meta-device stand-ins, so the graph's get_attr targets resolve
    gm.add_module(ARENA_PREFIX.rstrip("."), arena)
    for storage in sorted(storages, key=lambda s: s.start):
        leaf = _unique(storage.name, arena)
        name = ARENA_PREFIX + leaf
        arena.register_buffer(leaf, torch.empty(storage.shape, dtype=storage.dtype, device="meta"))
        plan.buffers[name] = Buffer(offsets[storage.key], storage.shape, storage.dtype)
        plan.lifetimes[name] = (storage.start, storage.end)
        with graph.inserting_before(first):
            buffer = graph.create_node("get_attr", name, name=leaf + "_buffer")
        node, index = storage.key
        value = node.meta["val"]
        buffer.meta["val"] = value[index] if isinstance(value, (list, tuple)) else value
        buffers[storage.key] = buffer
    for node in sorted(rewritable):
        _write_into(graph, node, buffers, out_forms)
    gm.meta["memory_plan"] = plan
    return PassResult(changed=bool(rewritable), matches=len(rewritable))


plan_memory = PlanMemory()


def _unique(name: str, holder: torch.nn.Module) -> str:
    candidate, suffix = name, 1
    while hasattr(holder, candidate):
        candidate, suffix = f"{name}_{suffix}", suffix + 1
    return candidate


def _write_into(graph: fx.Graph, node: fx.Node, buffers: dict[Any, fx.Node], out_forms: tuple[str, ...]) -> None:
    """Switch ``node`` to its out form, writing into its planned buffer(s)."""
    op = node.target
    assert isinstance(op, torch._ops.OpOverload)  # _rewritable's contract
    xllm_form = _xllm_out_form(op, out_forms)
    if xllm_form is None:
        out_op = _out_overload(op)
        assert out_op is not None
        node.target = out_op
        node.kwargs = {**node.kwargs, "out": buffers[(node, 0)]}
        return
    target, outs = xllm_form
    outputs = [buffers[(node, i)] for i in range(len(outs))]
    names = [a.name for a in op._schema.arguments]
    arguments = {**dict(zip(names, node.args, strict=False)), **node.kwargs}
    for argument in op._schema.arguments:  # the out form takes every argument: defaults the call left out too
        if argument.name not in arguments and argument.has_default_value():
            arguments[argument.name] = argument.default_value
    node.target = target
    node.args = ()
    node.kwargs = {**arguments, **dict(zip(outs, outputs, strict=True))}
    if len(outs) == 1:
        node.replace_all_uses_with(outputs[0])
    else:
        for user in list(node.users):
            if user.target is operator.getitem:
                index = user.args[1]
                assert isinstance(index, int)
                user.replace_all_uses_with(outputs[index])
                graph.erase_node(user)
    node.meta["val"] = None
