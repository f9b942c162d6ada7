"""Reference forms of the LLM building blocks, in plain torch, written once.

The models call these, and the fusion passes trace the very same functions as their patterns, so a
model and the pattern that fuses it cannot drift apart. Each matches Hugging Face transformers'
arithmetic step for step (dtype casts included): that is what makes logits agree to 1e-4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back before the weight, as Llama/Qwen/Mistral do."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim: the rotate-half form of rotary embeddings."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x [tokens, heads, head_dim] with cos/sin [tokens, 1, head_dim]."""
    return x * cos + rotate_half(x) * sin


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's elementwise half: silu(gate) * up."""
    return F.silu(gate) * up


def route_topk(router_logits: torch.Tensor, top_k: int, renormalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE routing: softmax over all experts in float32, the top ``top_k`` (weights [T, k] float32, ids
    [T, k] int64), renormalised to sum to one when asked: Qwen-MoE's and Mixtral's routers."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids
