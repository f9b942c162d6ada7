"""``xllm::rotary_embedding``: rotate-half rotary embedding of queries and keys in one op.

q [T, H, D] and k [T, Hkv, D] share cos/sin [T, 1, D], so one kernel rotates both. The CPU kernel is
the reference arithmetic; the NPU platform maps it to npu_rotary_mul.
"""

from __future__ import annotations

import torch

from xllm_compiler.ops.reference import apply_rotary


@torch.library.custom_op("xllm::rotary_embedding", mutates_args=())
def rotary_embedding(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)


@rotary_embedding.register_fake
def _(query, key, cos, sin):
    return torch.empty_like(query), torch.empty_like(key)
