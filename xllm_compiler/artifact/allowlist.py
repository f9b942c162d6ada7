"""The ops an artifact's graphs may call: checked when writing and again when loading.

A graph file names its ops as strings; ``resolve_target`` turns a name into a callable only when it is
on this list, so a tampered graph cannot reach anything else in torch (or Python). The list is the
vocabulary of decoder LLM graphs at ATen level, our ``xllm`` ops, and functional collectives.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch

from xllm_compiler.errors import ArtifactError

ATEN_OPS = frozenset(
    {
        "_assert_scalar",
        "_softmax",
        "_to_copy",
        "_unsafe_view",
        "abs",
        "add",
        "addmm",
        "alias",
        "amax",
        "any",
        "arange",
        "argmax",
        "baddbmm",
        "bitwise_and",
        "bitwise_not",
        "bitwise_or",
        "bmm",
        "cat",
        "chunk",
        "clamp",
        "clamp_min",
        "clone",
        "contiguous",
        "copy",
        "copy_",
        "cos",
        "cumsum",
        "detach",
        "div",
        "embedding",
        "empty",
        "empty_like",
        "eq",
        "exp",
        "expand",
        "fill",
        "fill_",
        "flatten",
        "full",
        "full_like",
        "gather",
        "ge",
        "gelu",
        "gt",
        "index",
        "index_add",
        "index_copy",
        "index_copy_",
        "index_put",
        "index_put_",
        "index_select",
        "le",
        "linear",
        "log",
        "logical_and",
        "logical_not",
        "logical_or",
        "lt",
        "masked_fill",
        "max",
        "maximum",
        "mean",
        "min",
        "minimum",
        "mm",
        "mul",
        "mv",
        "narrow",
        "ne",
        "neg",
        "new_empty",
        "new_full",
        "new_ones",
        "new_zeros",
        "ones",
        "ones_like",
        "permute",
        "pow",
        "reciprocal",
        "relu",
        "repeat",
        "repeat_interleave",
        "reshape",
        "rsqrt",
        "scalar_tensor",
        "scaled_dot_product_attention",
        "scatter",
        "select",
        "sigmoid",
        "silu",
        "sin",
        "slice",
        "softmax",
        "split",
        "split_with_sizes",
        "sqrt",
        "squeeze",
        "stack",
        "sub",
        "sum",
        "sym_constrain_range_for_size",
        "sym_size",
        "t",
        "tanh",
        "to",
        "topk",
        "transpose",
        "type_as",
        "unbind",
        "unflatten",
        "unsqueeze",
        "view",
        "where",
        "zeros",
        "zeros_like",
    }
)
#: Namespaces whose every op is allowed: ours, and torch's functional collectives.
OPEN_NAMESPACES = frozenset({"xllm", "_c10d_functional"})
PYTHON_OPS: dict[str, Callable] = {
    "operator.getitem": operator.getitem,
    "operator.add": operator.add,
    "operator.sub": operator.sub,
    "operator.mul": operator.mul,
    "operator.floordiv": operator.floordiv,
    "operator.mod": operator.mod,
    "operator.neg": operator.neg,
    "operator.eq": operator.eq,
    "operator.ne": operator.ne,
    "operator.lt": operator.lt,
    "operator.le": operator.le,
    "operator.gt": operator.gt,
    "operator.ge": operator.ge,
    "torch.sym_not": torch.sym_not,
    "torch.sym_max": torch.sym_max,
    "torch.sym_min": torch.sym_min,
}


def target_name(target: object) -> str:
    """The serialised name of a call_function target: 'aten.mm.default', 'operator.getitem'."""
    if isinstance(target, torch._ops.OpOverload):
        namespace, name = target.name().split("::")
        return f"{namespace}.{name.split('.')[0]}.{target._overloadname}"
    for name, fn in PYTHON_OPS.items():
        if fn is target:
            return name
    raise ArtifactError(f"op {target!r} cannot be stored in an artifact (not an allowed op)")


def resolve_target(name: str) -> Callable:
    """The op for a serialised name, refusing anything off the allowlist.

    Only an ``OpOverload`` that torch.ops resolves (``namespace.packet.overload`` with the overload
    listed by the packet) or a listed Python operator can come back: never an arbitrary attribute.
    """
    if not isinstance(name, str):
        raise ArtifactError(f"op {name!r} is not an allowed op")
    if name in PYTHON_OPS:
        return PYTHON_OPS[name]
    parts = name.split(".")
    if len(parts) != 3 or not all(p.isidentifier() and not p.startswith("__") for p in parts):
        raise ArtifactError(f"op '{name}' is not an allowed op")
    namespace, packet_name, overload = parts
    allowed = namespace in OPEN_NAMESPACES or (namespace == "aten" and packet_name in ATEN_OPS)
    if not allowed:
        raise ArtifactError(f"op '{name}' is not an allowed op")
    try:
        packet = getattr(getattr(torch.ops, namespace), packet_name)
        known = isinstance(packet, torch._ops.OpOverloadPacket) and overload in packet.overloads()
        op = getattr(packet, overload) if known else None
    except (AttributeError, RuntimeError):
        op = None
    if not isinstance(op, torch._ops.OpOverload):
        raise ArtifactError(f"op '{name}' does not exist in this torch build")
    return op


def check_allowed(target: object) -> str:
    """target_name(target), after checking it would load again."""
    name = target_name(target)
    resolve_target(name)
    return name
