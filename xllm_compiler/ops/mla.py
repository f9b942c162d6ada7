"""``xllm::mla_attention`` and ``xllm::latent_attention``: multi-head latent attention over a paged latent cache.

DeepSeek's MLA keeps one compressed row per token and layer in the cache, ``kv_cache [1, num_blocks,
block_size, 1, C]`` with ``C = kv_lora_rank + qk_rope_head_dim``: the normalised latent ``c`` and the rotated
key part ``k_pe`` every head shares. Keys and values are linear in the latent, through ``kv_b_proj``'s weight
``W [H * (nope + v), kv_lora_rank]``: per head, ``k_nope = W_k c`` and ``v = W_v c``. The two ops compute the
same attention two ways (metadata and padding as ``xllm::paged_attention``'s, ops/attention.py):

- ``mla_attention`` (what the model calls, as transformers computes it): the latent of every context
  token is expanded through W into per-head keys and values, then ordinary attention. Its cost grows with
  the context times ``H * (nope + v) * kv_lora_rank``: right for prefill, where the expansion is shared by
  all the chunk's queries.
- ``latent_attention`` (what the ``absorb_mla_weights`` pass makes for decode): W_k is folded into the query
  (``q_nope W_k`` per head) and W_v applied after attention, so attention runs as one multi-query attention
  directly over the cached rows, width C, keys and values both being the row (the values' rope columns are
  computed and dropped). Nothing is expanded: per token it reads C values per context position instead of
  ``H * (nope + v)``.

On the CPU both read the lengths on the host (``latent_attention`` through the native decode kernel, the
latent plane passed as key and value plane at once); elsewhere their capture-safe forms run (static shapes,
no host read), as attention's do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from xllm_compiler.ops.attention import (
    capture_safe_paged_attention_out,
    gather_context,
    host_pieces,
    paged_attention_out_kernel,
    sequence_mask,
    token_layout,
    visible_keys,
)

__all__ = [
    "CAPTURE_SAFE_KERNELS",
    "capture_safe_latent_attention",
    "capture_safe_mla_attention",
    "latent_attention",
    "latent_attention_kernel",
    "mla_attention",
    "mla_attention_kernel",
]


def _store_latent(latent: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write each token's cache row, [latent, k_pe], at its slot."""
    rows = torch.cat((latent, k_pe.flatten(1)), dim=-1)
    kv_cache[0].view(-1, rows.shape[-1]).index_copy_(0, slot_mapping, rows)


def _expand(
    rows: torch.Tensor, kv_b_weight: torch.Tensor, num_heads: int, nope: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached rows [..., L, C] -> keys [..., L, H, nope + rope] and values [..., L, H, v], as transformers'
    ``expand_kv`` does (the kv_b projection in the model dtype, the shared k_pe broadcast to every head)."""
    kv_lora = kv_b_weight.shape[1]
    kv = F.linear(rows[..., :kv_lora], kv_b_weight)
    kv = kv.view(*rows.shape[:-1], num_heads, kv.shape[-1] // num_heads)
    k_pe = rows[..., None, kv_lora:].expand(*rows.shape[:-1], num_heads, rows.shape[-1] - kv_lora)
    return torch.cat((kv[..., :nope], k_pe), dim=-1), kv[..., nope:]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """SDPA with values as wide as the keys: torch's fused CPU (and flash) kernels need equal head dims, and
    MLA's v_head_dim differs from qk_head_dim (measured at 512 tokens, 16 heads, bf16: 117 ms on SDPA's
    math path, 14 ms with the values zero-padded). Zero columns change neither the scores nor the kept
    output columns."""
    width, value_dim = q.shape[-1], v.shape[-1]
    if value_dim < width:
        return F.scaled_dot_product_attention(q, k, F.pad(v, (0, width - value_dim)), **kwargs)[..., :value_dim]
    if value_dim > width:
        pad = (0, value_dim - width)
        return F.scaled_dot_product_attention(F.pad(q, pad), F.pad(k, pad), v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def mla_attention_kernel(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    latent: torch.Tensor,
    k_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    kv_b_weight: torch.Tensor,
    scale: float,
    token_offset: int = 0,
) -> torch.Tensor:
    """Write the step's latent rows, then attend with keys and values expanded from each context.

    q_nope [T, H, nope], q_pe [T, H, rope] (rotated), latent [T, kv_lora], k_pe [T, 1, rope] (rotated),
    kv_b_weight [H * (nope + v), kv_lora]; returns [T, H, v]. Host-side on the CPU (the lengths are read to
    expand only the keys that exist), capture-safe elsewhere (``capture_safe_mla_attention``).
    """
    if kv_cache.device.type != "cpu":
        return capture_safe_mla_attention(
            q_nope, q_pe, latent, k_pe, kv_cache, slot_mapping, query_lens, seq_lens, block_tables, kv_b_weight,
            scale, token_offset,
        )  # fmt: skip
    _store_latent(latent, k_pe, kv_cache, slot_mapping)
    num_heads, nope = q_nope.shape[1], q_nope.shape[2]
    query = torch.cat((q_nope, q_pe), dim=-1)
    out = query.new_zeros(*query.shape[:2], kv_b_weight.shape[0] // num_heads - nope)
    pieces, _ = host_pieces(query_lens, seq_lens, token_offset, query.shape[0])
    for s, row0, row1, length in pieces:
        rows = gather_context(kv_cache[0], block_tables[s], length)[0]  # [L, C]
        keys, values = _expand(rows, kv_b_weight, num_heads, nope)
        q = query[row0:row1].transpose(0, 1)[None]
        k, v = keys.transpose(0, 1)[None], values.transpose(0, 1)[None]
        n = row1 - row0
        if n == length:
            attended = _sdpa(q, k, v, is_causal=True, scale=scale)
        else:
            attended = _sdpa(q, k, v, attn_mask=sequence_mask(n, length, 0, query.device), scale=scale)
        out[row0:row1] = attended[0].transpose(0, 1)
    return out


def capture_safe_mla_attention(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    latent: torch.Tensor,
    k_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    kv_b_weight: torch.Tensor,
    scale: float,
    token_offset: int = 0,
) -> torch.Tensor:
    """mla_attention as tensor ops of static shapes: every sequence's context, gathered to the block table's
    full width and expanded, side by side; each token attends over its own sequence's visible positions."""
    _store_latent(latent, k_pe, kv_cache, slot_mapping)
    num_tokens, num_heads, nope = q_nope.shape
    num_seqs, width = block_tables.shape
    block_size, _, row_width = kv_cache.shape[2:]
    rows = kv_cache[0].index_select(0, block_tables.reshape(-1)).view(1, num_seqs * width * block_size, row_width)
    keys, values = _expand(rows, kv_b_weight, num_heads, nope)  # [1, S * L, H, *]
    owner, position, real = token_layout(query_lens, seq_lens, num_tokens, token_offset)
    key_pos = torch.arange(width * block_size, device=q_nope.device).repeat(num_seqs)
    key_seq = torch.arange(num_seqs, device=q_nope.device).repeat_interleave(width * block_size)
    mask = visible_keys(key_pos[None, :], position[:, None], 0) & (key_seq[None, :] == owner[:, None])
    q = torch.cat((q_nope, q_pe), dim=-1).transpose(0, 1)[None]  # [1, H, T, nope + rope]
    attended = _sdpa(q, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask[None, None], scale=scale)
    attended = attended[0].transpose(0, 1)  # [T, H, v]
    return torch.where(real[:, None, None], attended, 0)


mla_attention = torch.library.custom_op("xllm::mla_attention", mla_attention_kernel, mutates_args=("kv_cache",))


@mla_attention.register_fake
def _(
    q_nope, q_pe, latent, k_pe, kv_cache, slot_mapping, query_lens, seq_lens, block_tables, kv_b_weight, scale,
    token_offset=0,
):  # fmt: skip
    value_dim = kv_b_weight.shape[0] // q_nope.shape[1] - q_nope.shape[2]
    return q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], value_dim)


def _latent_attention(
    attend: Callable[..., None],
    query: torch.Tensor,
    latent_kv: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    value_dim: int,
    token_offset: int,
) -> torch.Tensor:
    """Paged attention (``attend``: a paged_attention_out implementation) with the latent plane as both the
    key plane and the value plane (a stride-0 view: one copy in memory); the first ``value_dim`` columns of
    the result are the attention over the latent."""
    planes = kv_cache.expand(2, *kv_cache.shape[1:])
    out = torch.empty_like(query)
    metadata = (slot_mapping, query_lens, seq_lens, block_tables)
    attend(query, latent_kv, latent_kv, planes, *metadata, scale, 0, out, token_offset)
    return out[..., :value_dim].contiguous()


def latent_attention_kernel(
    query: torch.Tensor,
    latent_kv: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    value_dim: int,
    token_offset: int = 0,
) -> torch.Tensor:
    """Write the step's rows ``latent_kv [T, 1, C]``, then attend: query [T, H, C] (the absorbed nope part
    and the rotated rope part), keys the cached rows, values their first ``value_dim`` (kv_lora_rank)
    columns; returns [T, H, value_dim]. Where paged_attention is capture-safe, so is this."""
    metadata = (slot_mapping, query_lens, seq_lens, block_tables)
    args = (query, latent_kv, kv_cache, *metadata, scale, value_dim, token_offset)
    return _latent_attention(paged_attention_out_kernel, *args)


def capture_safe_latent_attention(
    query: torch.Tensor,
    latent_kv: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    value_dim: int,
    token_offset: int = 0,
) -> torch.Tensor:
    """latent_attention over ``capture_safe_paged_attention_out``, on every device."""
    metadata = (slot_mapping, query_lens, seq_lens, block_tables)
    args = (query, latent_kv, kv_cache, *metadata, scale, value_dim, token_offset)
    return _latent_attention(capture_safe_paged_attention_out, *args)


latent_attention = torch.library.custom_op(
    "xllm::latent_attention", latent_attention_kernel, mutates_args=("kv_cache",)
)


@latent_attention.register_fake
def _(query, latent_kv, kv_cache, slot_mapping, query_lens, seq_lens, block_tables, scale, value_dim, token_offset=0):
    return query.new_empty(query.shape[0], query.shape[1], value_dim)


#: The capture-safe kernel of each op here whose CPU kernel reads the lengths on the host.
CAPTURE_SAFE_KERNELS = {
    "xllm::mla_attention": capture_safe_mla_attention,
    "xllm::latent_attention": capture_safe_latent_attention,
}
