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


def route_grouped_topk(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    num_groups: int,
    topk_groups: int,
    renormalise: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's routing over float32 ``router_logits`` [T, E]: sigmoid scores; the bias steers the
    choice only; each of ``num_groups`` groups is scored by its two best biased scores and the best
    ``topk_groups`` kept; the top ``top_k`` experts of those are chosen, weighted by their unbiased scores
    (renormalised when asked) times ``scaling``. Returns weights [T, k] float32 and ids [T, k] int64."""
    scores = router_logits.sigmoid()
    biased = scores + correction_bias
    per_group = biased.shape[-1] // num_groups
    group_scores = biased.view(-1, num_groups, per_group).topk(2, dim=-1)[0].sum(dim=-1)
    groups = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False)[1]
    kept = torch.zeros_like(group_scores).scatter(1, groups, 1.0)
    kept = kept.unsqueeze(-1).expand(-1, num_groups, per_group).reshape(-1, num_groups * per_group)
    ids = torch.topk(biased.masked_fill(kept == 0, float("-inf")), k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if renormalise:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


def route_group_limited_softmax(
    router_logits: torch.Tensor, top_k: int, num_groups: int, topk_groups: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2's routing over float32 ``router_logits`` [T, E]: softmax; with groups ("group_limited_greedy")
    only the ``topk_groups`` groups with the best single score compete; the top ``top_k`` probabilities, not
    renormalised, times ``scaling``. One group is plain greedy top-k. Returns weights [T, k] float32 and ids."""
    scores = router_logits.softmax(dim=-1, dtype=torch.float32)
    if num_groups > 1:
        per_group = scores.shape[-1] // num_groups
        group_scores = scores.view(-1, num_groups, per_group).max(dim=-1).values
        groups = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False)[1]
        kept = torch.zeros_like(group_scores).scatter(1, groups, 1.0)
        kept = kept.unsqueeze(-1).expand(-1, num_groups, per_group).reshape(-1, num_groups * per_group)
        scores = scores.masked_fill(kept == 0, 0.0)
    weights, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    return weights * scaling, ids
