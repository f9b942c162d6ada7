"""Trace a model to an ATen-level FX GraphModule with torch.export, keeping the step dims symbolic.

What comes out is the form every pass works on:
- one placeholder per step input and KV cache, named as ``xllm_compiler.interface`` names them;
- weights as ``get_attr`` nodes on the GraphModule (not lifted inputs), so passes can fold and merge them;
- ``node.meta["val"]`` fake tensors whose sizes are sympy expressions of the named dims;
  ``gm.meta["symbols"]`` maps each dim name to its sympy symbol (e.g. ``{"num_tokens": s72}``).

torch.export's default IR keeps ``aten.linear`` and in-place custom ops as they were called, which is
the level our patterns are written at; trace-time ``_assert_tensor_metadata`` checks are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sympy
import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.export import Dim

from xllm_compiler.errors import CompileError
from xllm_compiler.interface import InputSpec

#: Upper bound of every symbolic dim; buckets and requests live far below it.
DIM_MAX = 1 << 20


def example_sizes(specs: Sequence[InputSpec]) -> dict[str, int]:
    """Distinct sizes per named dim (so export neither specialises 0/1 nor merges dims), multiples of
    16 (so that a model's divisibility checks on them hold while tracing)."""
    dims = sorted({d for spec in specs for d in spec.shape if isinstance(d, str)})
    return {name: 16 * (i + 1) for i, name in enumerate(dims)}


def example_tensor(spec: InputSpec, sizes: dict[str, int]) -> torch.Tensor:
    return torch.zeros([sizes[d] if isinstance(d, str) else d for d in spec.shape], dtype=spec.dtype)


def capture(module: torch.nn.Module, inputs: Sequence[InputSpec], kv_inputs: Sequence[InputSpec]) -> fx.GraphModule:
    """Export ``module(*inputs, [kv caches])`` with every named dim symbolic.

    Dims are first declared valid for every size from 1 up (so that export proves the graph has no
    branch on a size). Conditions export cannot prove for all sizes become ``_assert_scalar`` nodes
    (``prefer_deferred_runtime_asserts_over_guards``), checked per bucket and at run time. Only a
    model that narrows a dim's range (``torch._check(n <= 64)``) is traced again with open dims; its
    narrowed ranges, and export's own assumption that open dims are at least 2, then become guards
    that refuse the buckets outside them.
    """
    specs = [*inputs, *kv_inputs]
    sizes = example_sizes(specs)
    args = (*[example_tensor(s, sizes) for s in inputs], [example_tensor(s, sizes) for s in kv_inputs])

    def export(dims: dict[str, Any]) -> torch.export.ExportedProgram:
        def dynamic(spec: InputSpec) -> dict[int, Any]:
            return {i: dims[d] for i, d in enumerate(spec.shape) if isinstance(d, str)}

        dynamic_shapes = (*[dynamic(s) for s in inputs], [dynamic(s) for s in kv_inputs])
        return torch.export.export(
            module, args, dynamic_shapes=dynamic_shapes, strict=False, prefer_deferred_runtime_asserts_over_guards=True
        )

    try:
        try:
            program = export({name: Dim(name, min=1, max=DIM_MAX) for name in sizes})
        except torch._dynamo.exc.UserError:
            program = export({name: Dim.DYNAMIC for name in sizes})
    except Exception as exc:  # export raises many types; to the user they all mean "cannot trace"
        raise CompileError(f"torch.export failed to trace {type(module).__name__}: {exc}") from exc
    return _to_graph_module(program, specs)


def _to_graph_module(program: torch.export.ExportedProgram, specs: list[InputSpec]) -> fx.GraphModule:
    """Turn lifted weight placeholders into get_attr nodes, rename inputs, drop trace-time asserts."""
    signature = program.graph_signature
    lifted = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    graph = program.graph_module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    user_inputs = [n for n in placeholders if n.name not in lifted]
    if len(user_inputs) != len(specs):
        raise CompileError(f"export produced {len(user_inputs)} inputs, expected {len(specs)}")

    root: dict[str, torch.Tensor] = {}
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    for node in placeholders:
        if node.name not in lifted:
            continue
        fqn = lifted[node.name]
        root[fqn] = program.state_dict[fqn].detach()
        with graph.inserting_before(first_op):
            attr = graph.create_node("get_attr", fqn, name=fqn.replace(".", "_"))
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)

    symbols: dict[str, sympy.Symbol] = {}
    for node, spec in zip(user_inputs, specs, strict=True):
        node.name = node.target = spec.name
        for size, dim in zip(node.meta["val"].shape, spec.shape, strict=True):
            if isinstance(dim, str) and isinstance(size, torch.SymInt):
                symbols[dim] = size.node.expr

    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
    gm = fx.GraphModule(root, graph)
    gm.meta["symbols"] = symbols
    gm.meta["guards"] = _guards(program, symbols)
    return gm


def _guards(program: torch.export.ExportedProgram, symbols: dict[str, sympy.Symbol]) -> list[sympy.Basic]:
    """What tracing assumed about the dims, as sympy conditions: ranges and shape-environment guards
    (e.g. ``Eq(Mod(num_tokens, 2), 0)`` from a model's view). Specialising a bucket re-checks them."""
    known = set(symbols.values())
    guards: list[sympy.Basic] = []
    for symbol, bounds in program.range_constraints.items():
        if symbol in known:
            if bounds.lower.is_finite:
                guards.append(sympy.Ge(symbol, bounds.lower))
            if bounds.upper.is_finite:
                guards.append(sympy.Le(symbol, bounds.upper))
    fake_mode = detect_fake_mode([n.meta.get("val") for n in program.graph.nodes if "val" in n.meta])
    if fake_mode is not None and fake_mode.shape_env is not None:
        guards += [g.expr for g in fake_mode.shape_env.guards if g.expr.free_symbols & known]
    return guards
