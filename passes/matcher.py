"""Match a traced pattern graph against an ATen graph: anchored, linear-time, safe.

Why our own matcher, on torch.fx graphs: torch.fx's SubgraphMatcher compares arguments positionally
and literally (no commutative ops, no free literals), and a networkx subgraph isomorphism search is
exponential in the worst case and blind to argument order. LLM patterns are small trees anchored at
their output, so matching backwards from each candidate anchor costs O(pattern) per candidate and the
whole search is linear in graph size, which is what a 32-layer graph needs.

What the matcher handles:
- commutative ops (``add``, ``mul``): both operand orders are tried, with backtracking;
- literal arguments: a literal equal to a pattern parameter's sentinel binds that parameter (eps in
  one pattern matches every eps); other literals must be equal after normalising defaults;
- shape-derived ints: a pattern traced with symbolic shapes computes e.g. ``head_dim // 2`` from its
  inputs; it matches the graph's literal only if the value agrees for the bound inputs' shapes;
- several outputs (``fused_add_rms_norm`` returns the norm and the sum; rotary returns q and k);
- several matches per graph, never overlapping.
It refuses a match whose intermediate values are used outside it (fusing those would compute them
twice or drop them), and a match that would read a value some op in the graph mutates.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx

COMMUTATIVE = {torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor}
_INT_MAX = sys.maxsize
_INT_OPS = {
    operator.add: operator.add,
    operator.sub: operator.sub,
    operator.mul: operator.mul,
    operator.floordiv: operator.floordiv,
    operator.mod: operator.mod,
}


def normalized_args(node: fx.Node) -> tuple[list[Any], dict[str, Any]]:
    """A call's arguments with schema defaults filled in, so ``slice(x, 2, None)`` equals
    ``slice(x, 2, 0, INT_MAX)``: export prints the same call both ways depending on shape dynamism."""
    cached = node.meta.get("_normalized_args")
    if cached is not None and cached[0] == (node.args, node.kwargs):
        return cached[1]
    result: tuple[list[Any], dict[str, Any]] = (list(node.args), dict(node.kwargs))
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        args: list[Any] = []
        positional = [a for a in schema.arguments if not a.kwarg_only]
        for i, arg in enumerate(positional):
            if i < len(node.args):
                args.append(node.args[i])
            elif arg.name in node.kwargs:
                args.append(node.kwargs[arg.name])
            elif arg.has_default_value():
                args.append(arg.default_value)
            else:
                args = None
                break
        if args is not None:
            kwargs = {
                a.name: node.kwargs.get(a.name, a.default_value if a.has_default_value() else None)
                for a in schema.arguments
                if a.kwarg_only
            }
            if target is torch.ops.aten.slice.Tensor:
                args[2] = 0 if args[2] is None else args[2]
                args[3] = _INT_MAX if args[3] is None else args[3]
            result = (args, kwargs)
    node.meta["_normalized_args"] = ((node.args, node.kwargs), result)
    return result


def is_int_node(node: fx.Node) -> bool:
    """A pattern node computing an int from shapes (sym_size and arithmetic on it)."""
    value = node.meta.get("val")
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def _int_expr(value: Any) -> Any:
    if isinstance(value, fx.Node):
        value = value.meta.get("val")
    if isinstance(value, torch.SymInt):
        return value.node.expr
    return value


def same_int(a: Any, b: Any) -> bool:
    """Whether two sizes (ints, SymInts or int-valued nodes) are provably equal."""
    a, b = _int_expr(a), _int_expr(b)
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0
    except (sympy.SympifyError, TypeError):
        return False


@dataclass
class Match:
    """One occurrence of a pattern: graph nodes for its outputs, its parameters' values, its nodes."""

    outputs: list[fx.Node]
    bindings: dict[str, Any]
    nodes: dict[fx.Node, fx.Node] = field(default_factory=dict)  # pattern node -> graph node

    def graph_nodes(self) -> set[fx.Node]:
        return set(self.nodes.values())


class _State:
    """A partial match. Immutable in use: every binding step makes a copy, so each alternative the
    search tries (operand orders, candidates) carries its own state and a dead end leaves no trace."""

    def __init__(self):
        self.nodes: dict[fx.Node, fx.Node] = {}
        self.used: dict[fx.Node, fx.Node] = {}  # graph node -> pattern node
        self.bindings: dict[str, Any] = {}
        self.int_checks: list[tuple[fx.Node, Any]] = []

    def copy(self) -> _State:
        other = _State()
        other.nodes, other.used = dict(self.nodes), dict(self.used)
        other.bindings, other.int_checks = dict(self.bindings), list(self.int_checks)
        return other


class PatternGraph:
    """A pattern as a traced graph: placeholders are its tensor inputs, ``sentinels`` map literal values
    to its scalar parameters' names, and its outputs are matched anchor first.

    Matching is a depth-first search written as generators: each step yields every state under which
    its subtree matches, so a choice made in one operand (which input is ``q`` in ``q * cos``) is
    revisited when a sibling operand contradicts it.
    """

    def __init__(self, graph: fx.Graph, input_names: list[str], sentinels: dict[Any, str]):
        self.graph = graph
        self.input_names = input_names
        self.sentinels = sentinels
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self.placeholder_names = {p: name for p, name in zip(placeholders, input_names, strict=True)}
        output = next(n for n in graph.nodes if n.op == "output")
        flat = output.args[0] if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
        self.outputs: list[fx.Node] = list(flat)
        self.anchor = self.outputs[0]

    # -- matching ------------------------------------------------------------------------------

    def match_at(self, anchor: fx.Node, mutated: set[fx.Node]) -> Match | None:
        """The first complete, safe match whose anchor output is ``anchor``, or None."""
        for state in self._match_outputs(self.outputs, anchor, _State()):
            if self._checks_hold(state, mutated):
                outputs = [state.nodes[o] for o in self.outputs]
                return Match(outputs=outputs, bindings=state.bindings, nodes=state.nodes)
        return None

    def _match_outputs(self, outputs: list[fx.Node], anchor: fx.Node | None, state: _State) -> Iterator[_State]:
        if not outputs:
            yield state
            return
        first, rest = outputs[0], outputs[1:]
        if anchor is not None:
            candidates = [anchor]
        elif first in state.nodes:
            candidates = [state.nodes[first]]
        else:
            candidates = self._extra_output_candidates(first, state)
        for candidate in candidates:
            for matched in self._match_node(first, candidate, state):
                yield from self._match_outputs(rest, None, matched)

    def _extra_output_candidates(self, pattern_node: fx.Node, state: _State) -> list[fx.Node]:
        """An output outside the anchor's tree (rotary's k beside q) must hang off something matched
        already (the shared cos/sin): its candidates are found by walking down from those graph nodes,
        no deeper than the pattern itself, through ops the pattern uses."""
        targets = self._tree_targets(pattern_node)
        frontier = set(state.nodes.values()) | {v for v in state.bindings.values() if isinstance(v, fx.Node)}
        candidates: set[fx.Node] = set()
        for _ in range(self._tree_depth(pattern_node) + 1):
            frontier = {u for n in frontier for u in n.users if u.target in targets and u not in state.used}
            candidates |= {u for u in frontier if u.target == pattern_node.target}
        return sorted(candidates)

    def _tree_targets(self, pattern_node: fx.Node) -> set:
        targets, stack = set(), [pattern_node]
        while stack:
            node = stack.pop()
            if node.op == "call_function" and not is_int_node(node):
                targets.add(node.target)
                stack.extend(node.all_input_nodes)
        return targets

    def _tree_depth(self, pattern_node: fx.Node) -> int:
        inputs = [n for n in pattern_node.all_input_nodes if n.op == "call_function" and not is_int_node(n)]
        return 1 + max((self._tree_depth(n) for n in inputs), default=0)

    def _match_node(self, pattern_node: fx.Node, target: Any, state: _State) -> Iterator[_State]:
        if pattern_node.op == "placeholder":
            yield from self._bind(self.placeholder_names[pattern_node], target, state, tensor=True)
            return
        if is_int_node(pattern_node):
            if isinstance(target, int) or (isinstance(target, fx.Node) and is_int_node(target)):
                bound = state.copy()
                bound.int_checks.append((pattern_node, target))
                yield bound
            return
        if not isinstance(target, fx.Node) or target.op != "call_function":
            return
        if pattern_node in state.nodes:
            if state.nodes[pattern_node] is target:
                yield state
            return
        if target in state.used or target.target != pattern_node.target:
            return
        p_args, p_kwargs = normalized_args(pattern_node)
        t_args, t_kwargs = normalized_args(target)
        if len(p_args) != len(t_args) or p_kwargs.keys() != t_kwargs.keys():
            return
        orders = [t_args]
        if pattern_node.target in COMMUTATIVE and len(t_args) >= 2:
            orders.append([t_args[1], t_args[0], *t_args[2:]])
        for order in orders:
            claimed = state.copy()
            claimed.nodes[pattern_node] = target
            claimed.used[target] = pattern_node
            pairs = list(zip(p_args, order, strict=True)) + [(p_kwargs[k], t_kwargs[k]) for k in p_kwargs]
            yield from self._match_args(pairs, claimed)

    def _match_args(self, pairs: list[tuple[Any, Any]], state: _State) -> Iterator[_State]:
        if not pairs:
            yield state
            return
        (pattern_arg, target_arg), rest = pairs[0], pairs[1:]
        for matched in self._match_arg(pattern_arg, target_arg, state):
            yield from self._match_args(rest, matched)

    def _match_arg(self, pattern_arg: Any, target_arg: Any, state: _State) -> Iterator[_State]:
        if isinstance(pattern_arg, fx.Node):
            yield from self._match_node(pattern_arg, target_arg, state)
            return
        if isinstance(pattern_arg, (list, tuple)):
            if isinstance(target_arg, (list, tuple)) and len(pattern_arg) == len(target_arg):
                yield from self._match_args(list(zip(pattern_arg, target_arg, strict=True)), state)
            return
        if isinstance(pattern_arg, (int, float)) and not isinstance(pattern_arg, bool):
            name = self.sentinels.get(pattern_arg)
            if name is not None:
                yield from self._bind(name, target_arg, state, tensor=False)
                return
        if isinstance(target_arg, fx.Node) or type(pattern_arg) is not type(target_arg):
            if isinstance(pattern_arg, int) and is_int_node_value(target_arg, pattern_arg):
                yield state
            return
        if pattern_arg == target_arg:
            yield state

    def _bind(self, name: str, value: Any, state: _State, tensor: bool) -> Iterator[_State]:
        if tensor and not isinstance(value, fx.Node):
            return
        if not tensor and (isinstance(value, (fx.Node, bool)) or not isinstance(value, (int, float))):
            return
        if name in state.bindings:
            bound = state.bindings[name]
            if (bound is value) if tensor else (bound == value):
                yield state
            return
        bound_state = state.copy()
        bound_state.bindings[name] = value
        yield bound_state

    # -- safety --------------------------------------------------------------------------------

    def _checks_hold(self, state: _State, mutated: set[fx.Node]) -> bool:
        matched = set(state.nodes.values())
        outputs = {state.nodes[o] for o in self.outputs if o in state.nodes}
        for node in matched - outputs:
            if any(user not in matched for user in node.users):
                return False  # an intermediate escapes: fusing would lose or recompute it
        inputs = [v for v in state.bindings.values() if isinstance(v, fx.Node)]
        if any(node in mutated for node in inputs) or any(node in mutated for node in matched):
            return False
        return all(same_int(self._evaluate(p, state), t_value(t)) for p, t in state.int_checks)

    def _evaluate(self, pattern_node: fx.Node, state: _State) -> Any:
        """The value a pattern int node takes for the bound inputs' shapes."""
        if pattern_node.target is torch.ops.aten.sym_size.int:
            source, dim = pattern_node.args
            bound = state.bindings[self.placeholder_names[source]] if source.op == "placeholder" else None
            if bound is None:
                bound = state.nodes[source]
            return bound.meta["val"].shape[dim]
        fn = _INT_OPS.get(pattern_node.target)
        if fn is None:
            raise NotImplementedError(f"pattern int node {pattern_node.format_node()}")
        values = [self._evaluate(a, state) if isinstance(a, fx.Node) else a for a in pattern_node.args]
        return fn(*values)

    # -- search --------------------------------------------------------------------------------

    def find(self, graph: fx.Graph) -> Iterator[Match]:
        """Matches in graph order; a node is consumed by at most one match (callers rewrite as they go)."""
        mutated = mutated_nodes(graph)
        for node in [n for n in graph.nodes if n.op == "call_function" and n.target == self.anchor.target]:
            if node.graph is not graph or node._erased:
                continue
            match = self.match_at(node, mutated)
            if match is not None:
                yield match


def t_value(target: Any) -> Any:
    return target.meta["val"] if isinstance(target, fx.Node) else target


def is_int_node_value(target: Any, value: int) -> bool:
    return isinstance(target, fx.Node) and is_int_node(target) and same_int(target.meta["val"], value)


def mutated_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Values some op in the graph writes in place (e.g. the KV caches paged attention fills)."""
    mutated: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        for i, arg in enumerate(node.target._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                if isinstance(value, fx.Node):
                    mutated.add(value)
    return mutated


__all__ = ["COMMUTATIVE", "Match", "PatternGraph", "mutated_nodes", "normalized_args"]
