"""Specialise the dynamic graph to one bucket: symbolic step dims become that bucket's sizes.

Export records a value range for every dim and may leave guards in the graph as ``_assert_scalar``
nodes (divisibility, bounds). Both are evaluated with sympy for the bucket's sizes, so a bucket that
breaks a guard is refused at compile time, naming the guard, instead of failing at run time.
Symbolic-int nodes (``sym_size`` and integer arithmetic on it) fold to constants. Node metadata keeps
its symbolic shapes; ``gm.meta["sizes"]`` says how to evaluate them for this bucket.
"""

from __future__ import annotations

import sympy
import torch
from torch import fx
from torch.fx.node import map_arg

from xllm_compiler.buckets.policy import Bucket
from xllm_compiler.errors import OptionsError


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


def check_guards(gm: fx.GraphModule, bucket: Bucket) -> None:
    """Refuse a bucket for which one of the graph's recorded guards (ranges, divisibility) is false."""
    subs = substitutions(gm, bucket.sizes())
    names = {symbol: sympy.Symbol(name) for name, symbol in gm.meta["symbols"].items()}
    for guard in gm.meta.get("guards", []):
        if evaluate(guard, subs) is False:
            readable = sympy.sympify(guard).subs(names)
            sizes = ", ".join(f"{k}={v}" for k, v in bucket.sizes().items())
            raise OptionsError(f"bucket {bucket.name} ({sizes}) violates the guard {readable}")


def _fold(node: fx.Node, subs: dict[sympy.Symbol, int]) -> int | bool | None:
    """The constant an int- or bool-valued node (sizes, arithmetic and comparisons on them) takes for
    this bucket; None for tensor nodes and for values that stay symbolic."""
    if node.op != "call_function":
        return None
    value = node.meta.get("val")
    if isinstance(value, (torch.SymInt, torch.SymBool, int)) and not isinstance(value, bool):
        return evaluate(value, subs)
    return None


def _guard_text(condition: fx.Node, gm: fx.GraphModule) -> str:
    names = {symbol: sympy.Symbol(name) for name, symbol in gm.meta["symbols"].items()}
    value = condition.meta.get("val") if isinstance(condition, fx.Node) else condition
    expr = value.node.expr if isinstance(value, torch.SymBool) else value
    return str(sympy.sympify(expr).subs(names))


def specialize(gm: fx.GraphModule, bucket: Bucket) -> fx.GraphModule:
    """A copy of ``gm`` (sharing its weights) specialised to ``bucket``."""
    check_guards(gm, bucket)
    subs = substitutions(gm, bucket.sizes())
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    constants: dict[fx.Node, int | bool] = {}
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_scalar.default:
            condition = node.args[0]
            holds = constants.get(condition) if isinstance(condition, fx.Node) else condition
            if holds is False:
                sizes = ", ".join(f"{k}={v}" for k, v in bucket.sizes().items())
                raise OptionsError(f"bucket {bucket.name} ({sizes}) violates the guard {_guard_text(condition, gm)}")
            if holds is True:
                graph.erase_node(node)
            continue
        value = _fold(node, subs)
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
