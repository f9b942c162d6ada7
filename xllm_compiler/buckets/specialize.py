"""Specialise the dynamic graph to one bucket: symbolic step dims become that bucket's sizes.

Export records a value range for every dim and may leave guards in the graph as ``_assert_scalar``
nodes (divisibility, bounds). Both are evaluated with sympy for the bucket's sizes, so a bucket that
breaks a guard is refused at compile time, naming the guard, instead of failing at run time.
Symbolic-int nodes (``sym_size`` and integer arithmetic on it) fold to constants. Node metadata keeps
its symbolic shapes; ``gm.meta["sizes"]`` says how to evaluate them for this bucket.
"""

from __future__ import annotations

import operator

import sympy
import torch
from torch import fx
from torch.fx.node import map_arg

from xllm_compiler.buckets.policy import Bucket
from xllm_compiler.errors import OptionsError

_SCALAR_OPS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.floordiv,
    operator.mod,
    operator.neg,
    operator.eq,
    operator.ne,
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
}


def substitutions(gm: fx.GraphModule, sizes: dict[str, int]) -> dict[sympy.Symbol, int]:
    """sympy symbol -> size, for the named dims in ``sizes``."""
    symbols = gm.meta["symbols"]
    return {symbols[name]: value for name, value in sizes.items() if name in symbols}


def evaluate(expr, subs: dict[sympy.Symbol, int]) -> int | bool | None:
    """A SymInt/SymBool/sympy expression evaluated for ``subs``; None if it stays symbolic."""
    if isinstance(expr, (torch.SymInt, torch.SymBool)):
        expr = expr.node.expr
    value = sympy.sympify(expr).subs(subs)
    if value.is_Integer:
        return int(value)
    if value in (sympy.true, sympy.false):
        return bool(value)
    return None


def check_ranges(gm: fx.GraphModule, bucket: Bucket) -> None:
    """Refuse a bucket outside the range export recorded for one of its dims."""
    for name, size in bucket.sizes().items():
        lower, upper = gm.meta.get("ranges", {}).get(name, (1, size))
        if not lower <= size <= upper:
            raise OptionsError(f"bucket {bucket.name}: {name}={size} violates the guard {lower} <= {name} <= {upper}")


def _fold(node: fx.Node, subs, constants: dict[fx.Node, int | bool]) -> int | bool | None:
    if node.op != "call_function":
        return None
    if node.target is torch.ops.aten.sym_size.int:
        return evaluate(node.meta["val"], subs)
    if node.target in _SCALAR_OPS:
        values = [constants.get(a) if isinstance(a, fx.Node) else a for a in node.args]
        if all(isinstance(v, int) for v in values):
            return node.target(*values)
        value = node.meta.get("val")
        return evaluate(value, subs) if value is not None else None
    return None


def specialize(gm: fx.GraphModule, bucket: Bucket) -> fx.GraphModule:
    """A copy of ``gm`` (sharing its weights) specialised to ``bucket``."""
    check_ranges(gm, bucket)
    subs = substitutions(gm, bucket.sizes())
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    constants: dict[fx.Node, int | bool] = {}
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_scalar.default:
            condition = node.args[0]
            holds = constants.get(condition) if isinstance(condition, fx.Node) else condition
            if holds is False:
                raise OptionsError(f"bucket {bucket.name}: violates the guard '{node.args[1]}'")
            if holds is True:
                graph.erase_node(node)
            continue
        value = _fold(node, subs, constants)
        if value is not None:
            constants[node] = value
    for node in graph.nodes:
        node.args = map_arg(node.args, lambda n: constants.get(n, n))
        node.kwargs = map_arg(node.kwargs, lambda n: constants.get(n, n))
    for node in reversed(list(constants)):
        if not node.users:
            graph.erase_node(node)
    specialised = fx.GraphModule(gm, graph)
    specialised.meta.update(gm.meta)
    specialised.meta["sizes"] = dict(bucket.sizes())
    return specialised
