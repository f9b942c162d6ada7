"""``xllm::rotary_embedding``: rotate-half rotary embedding of queries and keys in one op.

q [T, H, D] and k [T, Hkv, D] share cos/sin [T, 1, D], so one kernel rotates both. The CPU kernel is
the reference arithmetic; the NPU platform maps it to npu_rotary_mul.
"""

from __future__ import annotations

import torch

from xllm_compiler.ops.reference import apply_rotary, rotate_half


def rotary_embedding_kernel(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)


rotary_embedding = torch.library.custom_op("xllm::rotary_embedding", rotary_embedding_kernel, mutates_args=())


@rotary_embedding.register_fake
def _(query, key, cos, sin):
    return torch.empty_like(query), torch.empty_like(key)


def _rotate_into(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> None:
    torch.add(x * cos, rotate_half(x) * sin, out=out)


def rotary_embedding_out_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    query_out: torch.Tensor,
    key_out: torch.Tensor,
) -> None:
    _rotate_into(query, cos, sin, query_out)
    _rotate_into(key, cos, sin, key_out)


rotary_embedding_out = torch.library.custom_op(
    "xllm::rotary_embedding_out", rotary_embedding_out_kernel, mutates_args=("query_out", "key_out")
)
