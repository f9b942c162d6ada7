"""The pass contract: a named, versioned callable over a GraphModule that says what it did.

A pass edits ``gm.graph`` in place and returns a ``PassResult``, which is truthy when the graph
changed and carries the number of matches it rewrote. It does not regenerate ``gm``'s code: the
PassManager does, once (call ``gm.recompile()`` yourself before running a graph a pass changed).

A pass's identity (name, version and frozen options, hashed) goes into the artifact's cache key, so
changing a pass invalidates what it produced before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import fx


@dataclass(frozen=True)
class PassResult:
    """What a pass did: whether the graph changed, and how many matches it rewrote."""

    changed: bool
    matches: int = 0

    def __bool__(self) -> bool:
        return self.changed


class GraphPass:
    """A graph pass: ``pass_(gm) -> PassResult``, with a stable ``name``, ``version`` and ``options``."""

    name: str
    version: int
    options: Any = None

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def identity(self) -> str:
        """sha256 of name, version and options: what the compile cache keys on."""
        options = dataclasses.asdict(self.options) if dataclasses.is_dataclass(self.options) else self.options
        blob = json.dumps([self.name, self.version, options], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"<pass {self.name} v{self.version}>"


class FunctionPass(GraphPass):
    """A pass written as a plain function ``fn(gm) -> PassResult | bool``."""

    def __init__(self, name: str, version: int, fn: Callable[[fx.GraphModule], PassResult | bool], options=None):
        self.name, self.version, self.options, self._fn = name, version, options, fn
        self.__doc__ = fn.__doc__ or sys.modules[fn.__module__].__doc__

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        result = self._fn(gm)
        return result if isinstance(result, PassResult) else PassResult(changed=bool(result))


def graph_pass(name: str, version: int) -> Callable[[Callable], FunctionPass]:
    """Decorator: turn ``def my_pass(gm) -> bool | PassResult`` into a named, versioned pass."""

    def wrap(fn: Callable) -> FunctionPass:
        return FunctionPass(name, version, fn)

    return wrap
