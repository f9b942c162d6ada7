"""A versioned, code-free JSON form of FX graphs: nodes, op names from the allowlist, literal arguments.

Why our own form: torch.export.save also writes a pickle (sample inputs), and torch.save is a pickle;
an artifact must load without executing anything it contains. Here a graph is data: every argument is
a JSON literal or a tagged object, every op resolves through ``allowlist.resolve_target``, and weights
are referenced by name from the safetensors file.

    {"format": "xllm-fx", "version": 1,
     "nodes": [{"name": "mm", "op": "call_function", "target": "aten.mm.default",
                "args": [{"node": "x"}, {"node": "w"}], "kwargs": {},
                "meta": {"shape": [8, 64], "dtype": "float32"}}, ...]}

``meta`` records each value's shape (ints, or dim expressions as strings in a dynamic graph) and dtype.
"""

from __future__ import annotations

import keyword
import math
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch import fx

from xllm_compiler.artifact.allowlist import check_allowed, resolve_target
from xllm_compiler.dtypes import DTYPES, dtype_name
from xllm_compiler.errors import ArtifactError
from xllm_compiler.interface import ARENA_PREFIX

GRAPH_FORMAT = "xllm-fx"
GRAPH_FORMAT_VERSION = 1

LAYOUTS = {"strided": torch.strided}
MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "preserve_format": torch.preserve_format,
    "channels_last": torch.channels_last,
}
NODE_OPS = ("placeholder", "get_attr", "call_function", "output")


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return dtype_name(dtype)
    except KeyError:
        raise ArtifactError(f"dtype {dtype} cannot be stored in an artifact") from None


def _size_value(size: Any, subs: dict[sympy.Symbol, Any]) -> int | str:
    """An int, or (in a dynamic graph) the size's expression over dim names, as a string."""
    if isinstance(size, int):
        return size
    expr = sympy.sympify(size.node.expr if isinstance(size, (torch.SymInt, torch.SymBool)) else size)
    value = expr.subs(subs)
    return int(value) if value.is_Integer else str(value)


def encode_meta(value: Any, subs: dict[sympy.Symbol, Any]) -> Any:
    """Shape/dtype of a node's value (a fake tensor, a tuple of them, a SymInt or None)."""
    if isinstance(value, torch.Tensor):
        return {"shape": [_size_value(s, subs) for s in value.shape], "dtype": _dtype_name(value.dtype)}
    if isinstance(value, (list, tuple)):
        return [encode_meta(v, subs) for v in value]
    if isinstance(value, (torch.SymInt, int)) and not isinstance(value, bool):
        return {"int": _size_value(value, subs)}
    return None


def encode_arg(arg: Any) -> Any:
    """One argument as JSON: literals stay literal, everything else becomes a tagged object."""
    if isinstance(arg, fx.Node):
        return {"node": arg.name}
    if arg is None or isinstance(arg, (bool, int, str)):
        return arg
    if isinstance(arg, float):
        return arg if math.isfinite(arg) else {"float": repr(arg)}
    if isinstance(arg, list):
        return [encode_arg(a) for a in arg]
    if isinstance(arg, tuple):
        return {"tuple": [encode_arg(a) for a in arg]}
    if isinstance(arg, torch.dtype):
        return {"dtype": _dtype_name(arg)}
    if isinstance(arg, torch.device):
        return {"device": arg.type}
    if isinstance(arg, torch.layout):
        return {"layout": str(arg).removeprefix("torch.")}
    if isinstance(arg, torch.memory_format):
        return {"memory_format": str(arg).removeprefix("torch.")}
    raise ArtifactError(f"argument {arg!r} of type {type(arg).__name__} cannot be stored in an artifact")


def meta_substitutions(gm: fx.GraphModule) -> dict[sympy.Symbol, Any]:
    """How to print a node's symbolic sizes: bucket sizes where specialised, dim names elsewhere."""
    sizes = gm.meta.get("sizes", {})
    return {sym: sizes.get(name, sympy.Symbol(name)) for name, sym in gm.meta.get("symbols", {}).items()}


def serialize_graph(gm: fx.GraphModule) -> dict:
    """The JSON-ready form of ``gm``'s graph (weights are referenced by get_attr target only)."""
    subs = meta_substitutions(gm)
    nodes = []
    for node in gm.graph.nodes:
        entry: dict[str, Any] = {"name": node.name, "op": node.op}
        if node.op == "call_function":
            entry["target"] = check_allowed(node.target)
        elif node.op in ("placeholder", "get_attr"):
            entry["target"] = str(node.target)
        elif node.op != "output":
            raise ArtifactError(f"node {node.name}: '{node.op}' nodes cannot be stored in an artifact")
        entry["args"] = encode_arg(list(node.args))
        entry["kwargs"] = {k: encode_arg(v) for k, v in node.kwargs.items()}
        if "val" in node.meta:
            entry["meta"] = encode_meta(node.meta["val"], subs)
        nodes.append(entry)
    data = {"format": GRAPH_FORMAT, "version": GRAPH_FORMAT_VERSION, "nodes": nodes}
    if "memory_plan" in gm.meta:
        data["memory_plan"] = gm.meta["memory_plan"].to_json()
    return data


class _Decoder:
    """Rebuilds argument values, resolving node references against the nodes made so far."""

    def __init__(self, device: torch.device, where: str):
        self.env: dict[str, fx.Node] = {}
        self.device = device
        self.where = where

    def fail(self, message: str) -> ArtifactError:
        return ArtifactError(f"{self.where}: {message}")

    def decode(self, value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, list):
            return [self.decode(v) for v in value]
        if not isinstance(value, dict) or len(value) != 1:
            raise self.fail(f"malformed argument {value!r}")
        ((tag, payload),) = value.items()
        if tag == "node":
            if payload not in self.env:
                raise self.fail(f"reference to unknown node '{payload}'")
            return self.env[payload]
        if tag == "tuple" and isinstance(payload, list):
            return tuple(self.decode(v) for v in payload)
        if tag == "float" and payload in ("inf", "-inf", "nan"):
            return float(payload)
        table = {"dtype": DTYPES, "layout": LAYOUTS, "memory_format": MEMORY_FORMATS}.get(tag)
        if table is not None and payload in table:
            return table[payload]
        if tag == "device" and payload in ("cpu", "cuda", "npu", "meta"):
            return self.device  # graphs are device-agnostic; they run where they are loaded
        raise self.fail(f"malformed argument {value!r}")


def _is_name(text: Any) -> bool:
    return isinstance(text, str) and text.isidentifier() and not keyword.iskeyword(text) and not text.startswith("__")


def _is_attribute_path(text: Any) -> bool:
    """'model.layers.0.mlp.weight': identifiers, or digits (module-list indices, quoted by fx)."""
    return isinstance(text, str) and all(_is_name(p) or (p.isdigit() and p.isascii()) for p in text.split("."))


def deserialize_graph(data: Any, device: torch.device, where: str) -> fx.Graph:
    """An fx.Graph from its JSON form, every op checked against the allowlist. ``where`` names the file."""
    decoder = _Decoder(device, where)
    if not isinstance(data, dict) or data.get("format") != GRAPH_FORMAT:
        raise decoder.fail(f"not an {GRAPH_FORMAT} graph")
    if data.get("version") != GRAPH_FORMAT_VERSION:
        raise decoder.fail(f"graph format version {data.get('version')!r} is not {GRAPH_FORMAT_VERSION}")
    graph = fx.Graph()
    outputs = 0
    for entry in data.get("nodes", []):
        try:
            name, op = entry["name"], entry["op"]
            args, kwargs = entry.get("args", []), entry.get("kwargs", {})
        except (TypeError, KeyError):
            raise decoder.fail(f"malformed node {entry!r}") from None
        # Names, keyword names and targets end up in the Python code fx generates for the graph:
        # anything but plain identifiers (and dotted paths of them for weights) is refused.
        if op not in NODE_OPS or not _is_name(name) or name in decoder.env:
            raise decoder.fail(f"malformed node {name!r}")
        if not isinstance(kwargs, dict) or not isinstance(args, list) or not all(map(_is_name, kwargs)):
            raise decoder.fail(f"node '{name}' has malformed arguments")
        if op == "call_function":
            try:
                target = resolve_target(entry.get("target", ""))
            except ArtifactError as exc:
                raise decoder.fail(str(exc)) from None
        elif op == "output":
            target, outputs = "output", outputs + 1
        else:
            target = entry.get("target")
            valid = target == name if op == "placeholder" else _is_attribute_path(target)
            if not valid:
                raise decoder.fail(f"node '{name}' has an invalid target {target!r}")
        node = graph.create_node(
            op, target, tuple(decoder.decode(args)), {k: decoder.decode(v) for k, v in kwargs.items()}, name=name
        )
        if node.name != name:
            raise decoder.fail(f"node name '{name}' is not a valid identifier")
        node.meta["xllm_meta"] = entry.get("meta")
        decoder.env[name] = node
    if outputs != 1:
        raise decoder.fail("a graph needs exactly one output node")
    try:
        graph.lint()
    except Exception as exc:  # lint raises several types for the same thing: an inconsistent graph
        raise decoder.fail(f"inconsistent graph ({exc})") from None
    return graph


@dataclass(frozen=True)
class ArenaBuffer:
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_memory_plan(data: dict, where: str) -> tuple[int, dict[str, ArenaBuffer]]:
    """(arena bytes, buffers by get_attr target) of a graph file; (0, {}) if it has no plan. Every
    buffer must lie inside the arena, aligned for its dtype."""
    plan = data.get("memory_plan")
    if plan is None:
        return 0, {}
    try:
        arena_bytes = int(plan["arena_bytes"])
        buffers = {
            name: ArenaBuffer(int(b["offset"]), tuple(int(s) for s in b["shape"]), DTYPES[b["dtype"]])
            for name, b in plan["buffers"].items()
        }
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ArtifactError(f"{where}: malformed memory_plan") from None
    for name, buffer in buffers.items():
        inside = buffer.offset >= 0 and buffer.offset + buffer.nbytes <= arena_bytes
        aligned = buffer.offset % buffer.dtype.itemsize == 0 and all(s >= 0 for s in buffer.shape)
        if not (name.startswith(ARENA_PREFIX) and _is_attribute_path(name) and inside and aligned):
            raise ArtifactError(f"{where}: memory_plan buffer {name!r} lies outside the arena")
    return arena_bytes, buffers
