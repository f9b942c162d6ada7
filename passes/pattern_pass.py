"""FusionPass: a pattern function and a replacement function, in plain torch, as a graph pass.

    def pattern(x, weight, eps):                 # calls the same reference op the models call
        return reference.rms_norm(x, weight, eps)

    def replacement(x, weight, eps):             # calls torch.ops.xllm / torch.ops.aten ops
        return torch.ops.xllm.rms_norm(x, weight, eps)

    fuse_rms_norm = FusionPass("fuse_rms_norm", version=1, pattern=pattern, replacement=replacement,
                               example_inputs=lambda: dict(x=torch.randn(4, 8), weight=torch.randn(8), eps=1e-6))

The pattern is traced to ATen with symbolic shapes (``make_fx(pre_dispatch=True)``: the IR
torch.export produces), in the graph's dtype, and canonicalised by the same cleanup passes the
pipeline runs first. Non-tensor example inputs are parameters: they are traced as unique sentinel
literals, so one pattern matches every value (every eps), and the matched value is handed to the
replacement. The replacement is traced straight into the graph at the match, its new nodes' shapes
propagated with the graph's fake-tensor mode. A pass may hold several rules, tried in order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.node import map_arg

from xllm_compiler.passes.cleanup.eliminate_common_subexpressions import eliminate_common_subexpressions
from xllm_compiler.passes.cleanup.eliminate_dead_code import eliminate_dead_code
from xllm_compiler.passes.cleanup.remove_noop_ops import remove_noop_ops
from xllm_compiler.passes.graph_pass import GraphPass, PassResult
from xllm_compiler.passes.matcher import Match, PatternGraph, same_int

#: The cleanup the pipeline runs before fusion; patterns get the same, so both sides look alike.
CANONICAL_CLEANUP = (remove_noop_ops, eliminate_common_subexpressions, eliminate_dead_code)


@dataclass(frozen=True)
class Rule:
    """One rewrite: every match of ``pattern`` becomes ``replacement`` (same parameters, same outputs)."""

    pattern: Callable[..., Any]
    replacement: Callable[..., Any]
    example_inputs: Callable[[], dict[str, Any]]
    check: Callable[[Match], bool] | None = None  # extra condition a match must meet


def same_shapes(*names: str) -> Callable[[Match], bool]:
    """A rule check: the named inputs have identical shapes (no broadcasting into a fused op)."""

    def check(match: Match) -> bool:
        shapes = [match.bindings[name].meta["val"].shape for name in names]
        return all(
            len(shape) == len(shapes[0]) and all(same_int(a, b) for a, b in zip(shape, shapes[0], strict=True))
            for shape in shapes[1:]
        )

    return check


def _sentinel(index: int, value: Any) -> Any:
    """A literal no real graph contains, standing for a scalar parameter while tracing."""
    if isinstance(value, bool):
        raise TypeError("bool pattern parameters are not supported; write one pattern per value")
    if isinstance(value, int):
        return 1_000_003 + 7 * index
    return 1.2345678e-3 + 1.1e-9 * index


def graph_float_dtype(gm: fx.GraphModule) -> torch.dtype:
    """The dtype of the graph's floating weights (our graphs have one)."""
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if node.op == "get_attr" and isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.dtype
    return torch.float32


def trace_pattern(fn: Callable[..., Any], example_inputs: dict[str, Any], dtype: torch.dtype) -> PatternGraph:
    """``fn`` traced to a canonical ATen pattern graph for ``dtype``."""
    tensor_names = [k for k, v in example_inputs.items() if isinstance(v, torch.Tensor)]
    scalars = {k: v for k, v in example_inputs.items() if not isinstance(v, torch.Tensor)}
    sentinels = {name: _sentinel(i, value) for i, (name, value) in enumerate(scalars.items())}

    def traced(*tensors: torch.Tensor) -> Any:
        return fn(**dict(zip(tensor_names, tensors, strict=True)), **sentinels)

    tensors = [example_inputs[k] for k in tensor_names]
    tensors = [t.to(dtype) if t.is_floating_point() else t for t in tensors]
    gm = make_fx(traced, pre_dispatch=True, tracing_mode="symbolic")(*tensors)
    for cleanup in CANONICAL_CLEANUP:
        cleanup(gm)
    return PatternGraph(gm.graph, tensor_names, {v: k for k, v in sentinels.items()})


def _new_nodes_between(first: fx.Node, stop: fx.Node) -> list[fx.Node]:
    nodes, node = [], first.next
    while node is not stop:
        nodes.append(node)
        node = node.next
    return nodes


def _propagate_meta(nodes: list[fx.Node], fake_mode) -> None:
    """Fake-run the new nodes so they carry shapes like the rest of the graph (graphs whose shapes are
    meta-device tensors, as the micro-batch split leaves them, run on the meta device instead)."""
    context = fake_mode if fake_mode is not None else contextlib.nullcontext()
    with context, torch.no_grad():
        for node in nodes:
            args = map_arg(node.args, lambda n: n.meta["val"])
            kwargs = map_arg(node.kwargs, lambda n: n.meta["val"])
            node.meta["val"] = node.target(*args, **kwargs)


def apply_replacement(graph: fx.Graph, match: Match, replacement: Callable[..., Any], fake_mode) -> bool:
    """Trace ``replacement`` into ``graph`` for ``match`` and reroute the match's outputs to it.

    The new nodes go right after the match's last input; a match whose outputs are used before that
    point is declined (returns False) rather than reordered.
    """
    inputs = [v for v in match.bindings.values() if isinstance(v, fx.Node)]
    last_input = max(inputs)
    matched = match.graph_nodes()
    external = [u for out in match.outputs for u in out.users if u not in matched]
    if any(user < last_input for user in external):
        return False
    stop = last_input.next
    tracer = fx.proxy.GraphAppendingTracer(graph)
    with graph.inserting_before(stop):
        proxies = {k: fx.Proxy(v, tracer) if isinstance(v, fx.Node) else v for k, v in match.bindings.items()}
        result = replacement(**proxies)
    results = list(result) if isinstance(result, (tuple, list)) else [result]
    if len(results) != len(match.outputs):
        raise ValueError(f"replacement returned {len(results)} values for {len(match.outputs)} pattern outputs")
    new_nodes = _new_nodes_between(last_input, stop)
    _propagate_meta(new_nodes, fake_mode)
    for old, new in zip(match.outputs, results, strict=True):
        old.replace_all_uses_with(new.node, delete_user_cb=lambda user: user not in matched)
    for node in sorted(matched, reverse=True):
        if not node.users:
            graph.erase_node(node)
    for node in reversed(new_nodes):  # e.g. the getitem of an output nobody used
        if not node.users and not node.is_impure():
            graph.erase_node(node)
    return True


def _on_meta(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_on_meta(v) for v in value)
    return isinstance(value, torch.Tensor) and value.device.type == "meta" and not is_fake(value)


class FusionPass(GraphPass):
    """A graph pass made of pattern/replacement rules; ``matches`` counts the rewrites."""

    def __init__(
        self,
        name: str,
        version: int,
        pattern: Callable[..., Any] | None = None,
        replacement: Callable[..., Any] | None = None,
        example_inputs: Callable[[], dict[str, Any]] | None = None,
        rules: list[Rule] | None = None,
        check: Callable[[Match], bool] | None = None,
    ):
        self.name, self.version = name, version
        single = [Rule(pattern, replacement, example_inputs, check)] if pattern is not None else []
        self.rules: list[Rule] = single + list(rules or [])
        if not self.rules:
            raise ValueError(f"{name}: a FusionPass needs a pattern or rules")
        self._patterns: dict[tuple[int, torch.dtype], PatternGraph] = {}

    def pattern_graph(self, rule_index: int, dtype: torch.dtype) -> PatternGraph:
        key = (rule_index, dtype)
        if key not in self._patterns:
            rule = self.rules[rule_index]
            self._patterns[key] = trace_pattern(rule.pattern, rule.example_inputs(), dtype)
        return self._patterns[key]

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        dtype = graph_float_dtype(gm)
        values = [n.meta.get("val") for n in gm.graph.nodes if "val" in n.meta]
        fake_mode = None if any(_on_meta(v) for v in values) else detect_fake_mode(values)
        count = 0
        for index, rule in enumerate(self.rules):
            pattern = self.pattern_graph(index, dtype)
            for match in pattern.find(gm.graph):
                if rule.check is not None and not rule.check(match):
                    continue
                count += apply_replacement(gm.graph, match, rule.replacement, fake_mode)
        return PassResult(changed=count > 0, matches=count)


__all__ = ["FusionPass", "Rule", "apply_replacement", "graph_float_dtype", "same_shapes", "trace_pattern"]
