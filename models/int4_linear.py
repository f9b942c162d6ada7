"""A linear layer on a checkpoint's 4- or 8-bit GPTQ / AWQ weight, kept in its integers: ``xllm::linear_w4``.

A GPTQ or AWQ checkpoint means ``(q - zero) * scale`` per group of inputs; linear_w4 computes ``q * scale +
offset`` per group, the same values with ``offset = -zero * scale`` (models/int_quant.py converts them at
load, exactly). So the compiled model reads the checkpoint's own 4.5 bits a weight instead of a float copy,
and no rounding is added on top of the one its quantizer made. Act-order checkpoints, whose groups are
scattered over the inputs, have their inputs sorted by group at load: the layer gathers its input in that
order (one ``index_select`` of K values a row) before the product. An 8-bit weight is two 4-bit planes over
the same inputs, so its gather reads each input twice (2K values a row).
"""

from __future__ import annotations

import torch
from torch import nn

import xllm_compiler.ops  # noqa: F401  (registers torch.ops.xllm)
from xllm_compiler.models.int_quant import Int4Weight
from xllm_compiler.models.parallel import TRACED_GROUP
from xllm_compiler.ops.collectives import all_reduce


class Int4Linear(nn.Module):
    """``y = linear_w4(x[..., input_order], qweight, scale, offset, group_size) + bias``; with
    ``all_reduce`` (a row-parallel shard) the partial products are summed over the ranks before the bias
    is added once, as RowParallelLinear does."""

    def __init__(self, weight: Int4Weight, in_features: int, bias: nn.Parameter | None, all_reduce: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, weight.qweight.shape[0]
        self.group_size = weight.group_size
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("offset", weight.offset)
        self.register_buffer("input_order", weight.input_order)
        self.bias = bias
        self.all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_order is not None:
            x = x.index_select(-1, self.input_order)
        bias = None if self.all_reduce else self.bias
        y = torch.ops.xllm.linear_w4(x, self.qweight, self.scale, self.offset, self.group_size, bias)
        if not self.all_reduce:
            return y
        y = all_reduce(y, TRACED_GROUP)
        return y if self.bias is None else y + self.bias


def parameter_count(model: nn.Module) -> int:
    """``model``'s parameters, the weight of each Int4Linear counted by its elements (it is a buffer)."""
    packed = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Int4Linear))
    return packed + sum(p.numel() for p in model.parameters())
