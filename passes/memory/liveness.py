"""Storages and their lifetimes in a bucket-specialised graph: what the memory planner places.

A *storage* is a buffer an op allocates: one per tensor output of a call. Views (``view``,
``unsqueeze``, the pieces of a ``split``...) and ops that write in place do not allocate: they share
their base's storage, which therefore lives until the last use of any of them. Storages that hold a
graph input or weight, or that reach the graph's outputs, are not planned (their memory must outlive
the call); everything else is, from its first definition to its last use, in node order.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from xllm_compiler.passes.bucket_sizes import bucket_substitutions, concrete

#: (node, output index): the identity of a storage.
StorageKey = tuple[fx.Node, int]


@dataclass
class Storage:
    key: StorageKey
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # index of the node that allocates it
    end: int  # index of the last node that reads it (or a view of it)
    users: set[fx.Node] = field(default_factory=set)

    @property
    def name(self) -> str:
        node, index = self.key
        return f"{node.name}_out{index}" if index else node.name


def _aliases_input(target: Any) -> int | None:
    """Index of the argument an op's first output is a view of (or writes into), else None."""
    if target is operator.getitem:
        return 0
    if not isinstance(target, torch._ops.OpOverload):
        return None
    returns = target._schema.returns
    if not returns or returns[0].alias_info is None:
        return None
    alias_set = returns[0].alias_info.before_set
    aliasing = [i for i, arg in enumerate(target._schema.arguments) if arg.alias_info is not None]
    for i in aliasing:
        if target._schema.arguments[i].alias_info.before_set == alias_set:
            return i
    # A list of views (split's ``Tensor(a)[]``) carries its alias set on the element type, which the
    # schema API does not expose; it aliases the one argument that has one.
    return aliasing[0] if not alias_set and len(aliasing) == 1 else None


class Liveness:
    """The storages of ``gm`` (specialised: ``gm.meta['sizes']``) and the storage behind every value."""

    def __init__(self, gm: fx.GraphModule):
        self.subs = bucket_substitutions(gm)
        self.order = {node: i for i, node in enumerate(gm.graph.nodes)}
        self.storage_of: dict[tuple[fx.Node, int], StorageKey | None] = {}
        self.storages: dict[StorageKey, Storage] = {}
        self.pinned: set[StorageKey] = set()  # inputs, weights, outputs: not planned
        for node in gm.graph.nodes:
            self._visit(node)

    def _value_storage(self, value: Any, index: int = 0) -> StorageKey | None:
        if isinstance(value, fx.Node):
            return self.storage_of.get((value, index))
        return None

    def _visit(self, node: fx.Node) -> None:
        index = self.order[node]
        if node.op in ("placeholder", "get_attr"):
            key = (node, 0)
            self.storage_of[(node, 0)] = key
            self.pinned.add(key)
            return
        if node.op == "output":
            for arg in node.all_input_nodes:
                self._use(arg, index, node)
                key = self._value_storage(arg)
                if key is not None:
                    self.pinned.add(key)
            return
        for arg in node.all_input_nodes:
            self._use(arg, index, node)
        value = node.meta.get("val")
        if node.target is operator.getitem:
            source, position = node.args
            self.storage_of[(node, 0)] = self._getitem_storage(source, position)
            return
        aliased = _aliases_input(node.target)
        if aliased is not None and aliased < len(node.args):
            self.storage_of[(node, 0)] = self._value_storage(node.args[aliased])
            if isinstance(value, (list, tuple)):  # split: every piece is a view of the input
                for i in range(len(value)):
                    self.storage_of[(node, i)] = self.storage_of[(node, 0)]
            return
        outputs = value if isinstance(value, (list, tuple)) else [value]
        for i, out in enumerate(outputs):
            if isinstance(out, torch.Tensor):
                key = (node, i)
                self.storage_of[key] = key
                shape = tuple(concrete(s, self.subs) for s in out.shape)
                numel = 1
                for s in shape:
                    numel *= s
                self.storages[key] = Storage(key, numel * out.element_size(), out.dtype, shape, index, index)

    def _getitem_storage(self, source: fx.Node, position: int) -> StorageKey | None:
        if (source, position) in self.storage_of:
            return self.storage_of[(source, position)]
        return self.storage_of.get((source, 0))

    def _use(self, value: fx.Node, index: int, user: fx.Node) -> None:
        outputs = value.meta.get("val")
        count = len(outputs) if isinstance(outputs, (list, tuple)) else 1
        for i in range(count):
            key = self.storage_of.get((value, i))
            if key in self.storages:
                storage = self.storages[key]
                storage.end = max(storage.end, index)
                storage.users.add(user)

    def planned(self) -> list[Storage]:
        """Storages the planner may place: allocated by the graph, dead by its end."""
        return [s for key, s in self.storages.items() if key not in self.pinned and s.nbytes > 0]

    def lower_bound(self, storages: list[Storage], alignment: int = 1) -> int:
        """The peak, over the schedule, of the bytes of ``storages`` alive at once, each rounded up to
        ``alignment`` (the arena's allocation granule): no placement can use less."""
        events: dict[int, int] = {}
        for s in storages:
            size = -(-s.nbytes // alignment) * alignment
            events[s.start] = events.get(s.start, 0) + size
            events[s.end + 1] = events.get(s.end + 1, 0) - size
        live = peak = 0
        for step in sorted(events):
            live += events[step]
            peak = max(peak, live)
        return peak
