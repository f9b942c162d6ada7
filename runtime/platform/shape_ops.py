"""Shape-only ATen ops of a lowered CPU graph called through torch's Tensor methods.

The generated forward of a decode bucket calls a view, a split or an unsqueeze a few times per layer. An
``OpOverload`` call (``torch.ops.aten.view.default(x, size)``) parses and boxes its arguments through the
dispatcher's generic path; the Tensor method's generated binding does not. Measured on the ~100M Llama's
bfloat16 decode graph at batch 1 (Zen 4, each node replayed alone): a view 4.5 us as an OpOverload and
1.4 as ``x.view(size)``, a split 6.7 and 1.9; 62 such calls a step. The functions take exactly the ops'
positional arguments, so a node keeps its arguments and only its target changes.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def view(tensor: torch.Tensor, size: list[int]) -> torch.Tensor:
    return tensor.view(size)


def reshape(tensor: torch.Tensor, shape: list[int]) -> torch.Tensor:
    return tensor.reshape(shape)


def unsqueeze(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    return tensor.unsqueeze(dim)


def split_with_sizes(tensor: torch.Tensor, split_sizes: list[int], dim: int = 0) -> tuple[torch.Tensor, ...]:
    return tensor.split_with_sizes(split_sizes, dim)


#: The ATen overload -> its Tensor-method form.
TENSOR_METHODS = {
    aten.view.default: view,
    aten.reshape.default: reshape,
    aten.unsqueeze.default: unsqueeze,
    aten.split_with_sizes.default: split_with_sizes,
}


def use_tensor_methods(graph: torch.fx.Graph) -> int:
    """Retarget every positional-only call of a TENSOR_METHODS op in ``graph``; returns how many."""
    count = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target in TENSOR_METHODS and not node.kwargs:
            node.target = TENSOR_METHODS[node.target]
            count += 1
    return count
