"""``xllm::paged_attention`` and ``xllm::write_kv_cache``: attention over a paged KV cache, as opaque ops.

Tokens of a step are flattened: ``query [T, H, D]`` holds the new tokens of every sequence back to back,
sequence ``s`` owning ``query_lens[s]`` of them. Its keys and values live in fixed-size blocks of
``kv_cache [2, num_blocks, block_size, Hkv, D]``; row ``s`` of ``block_tables`` lists them, and
``seq_lens[s]`` counts its context including the new tokens. Prefill, chunked prefill and decode are
the same call with different lengths. Tokens past ``sum(query_lens)`` are padding: their K/V go to the
reserved slot their ``slot_mapping`` names (block 0) and their output is zero.

Two torch implementations, both used on devices that have no fused kernel registered by the platform layer:

- ``capture_safe_paged_attention_out`` runs everywhere but on the CPU, and is the reference: the metadata
  stay tensors on the device and are never read back to the host, and every shape depends only on static
  sizes (num_tokens, num_seqs, the block table's width), so graph capture (CUDA graphs, aclgraph) can
  record it. tests/test_capture_safety.py audits it in every bucket graph.
- On the CPU, where the host is the device and nothing is captured, the native decode kernel and a
  per-sequence loop over the actual lengths (``_host_paged_attention_out``) attend over only the keys
  that exist: faster, and not capture-safe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xllm_compiler.ops.native import native_kernels

__all__ = [
    "CAPTURE_SAFE_KERNELS",
    "capture_safe_paged_attention",
    "capture_safe_paged_attention_out",
    "gather_context",
    "host_pieces",
    "paged_attention",
    "paged_attention_kernel",
    "paged_attention_out",
    "paged_attention_out_kernel",
    "sequence_mask",
    "token_layout",
    "visible_keys",
    "write_kv_cache",
    "write_kv_cache_kernel",
]


def write_kv_cache_kernel(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store key/value [T, Hkv, D] at cache slots ``slot_mapping`` [T] (slot = block * block_size + offset)."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


write_kv_cache = torch.library.custom_op("xllm::write_kv_cache", write_kv_cache_kernel, mutates_args=("kv_cache",))


@write_kv_cache.register_fake
def _(key, value, kv_cache, slot_mapping) -> None:
    return None


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` cached positions of one sequence, as [Hkv, length, D]."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = cache.index_select(0, block_table[:num_blocks])
    return blocks.flatten(0, 1)[:length].transpose(0, 1)


def sequence_mask(query_len: int, seq_len: int, sliding_window: int, device: torch.device) -> torch.Tensor:
    """Causal (and optionally sliding-window) mask [query_len, seq_len] for the last query_len positions."""
    query_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    key_pos = torch.arange(seq_len, device=device)[None, :]
    mask = key_pos <= query_pos
    if sliding_window > 0:
        mask &= key_pos > query_pos - sliding_window
    return mask


def _attend_one_sequence(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    scale: float,
    sliding_window: int,
) -> torch.Tensor:
    query_len = query.shape[0]
    keys = gather_context(kv_cache[0], block_table, seq_len)[None]
    values = gather_context(kv_cache[1], block_table, seq_len)[None]
    q = query.transpose(0, 1)[None]
    windowed = 0 < sliding_window < seq_len
    if query_len == 1 and not windowed:
        out = F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=True)
    elif query_len == seq_len and not windowed:
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale, enable_gqa=True)
    else:
        mask = sequence_mask(query_len, seq_len, sliding_window, query.device)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def _attend_decode_batch(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    scale: float,
    sliding_window: int,
) -> torch.Tensor:
    """One query token per sequence (row i of ``block_tables`` for query i): gather every context into
    one padded batch and attend once."""
    block_size = kv_cache.shape[2]
    max_len = max(seq_lens)
    num_blocks = -(-max_len // block_size)
    tables = block_tables[:, :num_blocks]
    keys = kv_cache[0][tables].flatten(1, 2)[:, :max_len].transpose(1, 2)
    values = kv_cache[1][tables].flatten(1, 2)[:, :max_len].transpose(1, 2)
    lengths = torch.tensor(seq_lens, device=query.device)[:, None]
    key_pos = torch.arange(max_len, device=query.device)[None, :]
    mask = key_pos < lengths
    if sliding_window > 0:
        mask &= key_pos >= lengths - sliding_window
    q = query[:, :, None, :]
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
    )
    return out[:, :, 0, :]


def _store(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """The cache write: inline on CPU (no dispatcher round trip), through the op elsewhere so that a
    platform's fused kernel (NPU: reshape_and_cache) takes it."""
    if kv_cache.device.type == "cpu":
        write_kv_cache_kernel(key, value, kv_cache, slot_mapping)
    else:
        torch.ops.xllm.write_kv_cache.default(key, value, kv_cache, slot_mapping)


def token_layout(
    query_lens: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int, token_offset: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows [token_offset, token_offset + num_tokens) of the step: each token's sequence, its position
    in that sequence, and whether it is a real token (not padding); [num_tokens] each, all on the device.

    Sequence s owns the tokens [ends[s] - query_lens[s], ends[s]); searchsorted finds, for each token, the
    first sequence whose end lies beyond it (zero-length sequences own nothing and are skipped).
    Padding tokens are given sequence num_seqs - 1 and position 0, so that they see one key and their
    softmax stays finite; their output is zeroed afterwards.
    """
    ends = torch.cumsum(query_lens, 0)
    tokens = torch.arange(token_offset, token_offset + num_tokens, device=query_lens.device, dtype=ends.dtype)
    owner = torch.searchsorted(ends, tokens, right=True)
    real = owner < query_lens.shape[0]
    owner = owner.clamp(max=query_lens.shape[0] - 1)
    position = (seq_lens - ends).index_select(0, owner) + tokens
    return owner, torch.where(real, position, 0), real


def visible_keys(key_pos: torch.Tensor, query_pos: torch.Tensor, sliding_window: int) -> torch.Tensor:
    """Which keys each query sees: causal, and within the sliding window when there is one."""
    mask = key_pos <= query_pos
    if sliding_window > 0:
        mask &= key_pos > query_pos - sliding_window
    return mask


def _contexts(kv_cache: torch.Tensor, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of every row of ``tables`` [G, max_blocks], as [G, max_blocks * block_size, Hkv, D]:
    position p of a row sits at index p (blocks past a sequence's end are gathered and masked off)."""
    rows, width = tables.shape
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    flat = tables.reshape(-1)
    shape = (rows, width * block_size, num_kv_heads, head_dim)
    return kv_cache[0].index_select(0, flat).view(shape), kv_cache[1].index_select(0, flat).view(shape)


def _one_context_per_token(num_tokens: int, num_seqs: int, num_heads: int, kv_width: int) -> bool:
    """Whether gathering one context per token moves fewer values than attending every token over all
    contexts. Per context position: T gathered key/value rows and T * H scores, against S rows and
    S * T * H scores (``kv_width`` = Hkv * D, the width of one key row)."""
    return num_tokens * (num_heads + 2 * kv_width) <= num_seqs * (num_tokens * num_heads + 2 * kv_width)


def capture_safe_paged_attention_out(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int,
    out: torch.Tensor,
    token_offset: int = 0,
) -> None:
    """paged_attention_out as tensor ops of static shapes: capture-safe (see the module docstring).

    Every context is gathered to the block table's full width L and masked; of two layouts, the one that
    moves fewer values for these static sizes is taken: one context per token (queries [T, H, 1, D] against
    [T, Hkv, L, D]: decode, where T is about S) or all S contexts side by side for every token (queries
    [1, H, T, D] against [1, Hkv, S * L, D]: prefill of few sequences). Both cost more than the CPU path,
    which attends over only the keys that exist: the price of shapes that do not depend on the lengths.
    """
    _store(key, value, kv_cache, slot_mapping)
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = block_tables.shape[0]
    owner, position, real = token_layout(query_lens, seq_lens, num_tokens, token_offset)
    per_token = _one_context_per_token(num_tokens, num_seqs, num_heads, kv_cache.shape[3] * head_dim)
    keys, values = _contexts(kv_cache, block_tables.index_select(0, owner) if per_token else block_tables)
    key_pos = torch.arange(keys.shape[1], device=query.device)
    if per_token:
        q = query[:, :, None, :]  # [T, H, 1, D]
        mask = visible_keys(key_pos[None, :], position[:, None], sliding_window)[:, None, None, :]  # [T, 1, 1, L]
    else:
        q = query.transpose(0, 1)[None]  # [1, H, T, D]
        keys, values = keys.flatten(0, 1)[None], values.flatten(0, 1)[None]  # [1, S * L, Hkv, D]
        key_seq = torch.arange(num_seqs, device=query.device).repeat_interleave(key_pos.shape[0])
        mask = visible_keys(key_pos.repeat(num_seqs)[None, :], position[:, None], sliding_window)
        mask = (mask & (key_seq[None, :] == owner[:, None]))[None, None]  # [1, 1, T, S * L]
    attended = F.scaled_dot_product_attention(
        q, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=scale, enable_gqa=True
    )
    attended = attended[:, :, 0] if per_token else attended[0].transpose(0, 1)  # [T, H, D]
    out.copy_(torch.where(real[:, None, None], attended, 0))


def paged_attention_out_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int,
    out: torch.Tensor,
    token_offset: int = 0,
) -> None:
    """paged_attention writing its result into ``out`` (a planned arena buffer).

    ``token_offset``: query/key/value/slot_mapping/out hold the step's tokens [offset, offset + n)
    while the metadata describes the whole step, so a micro-batch can attend on its own; a sequence
    cut in two sees, in its second half, the keys its first half wrote.

    Capture-safe everywhere but on the CPU (``capture_safe_paged_attention_out``); the CPU takes its
    host-side fast path (see the module docstring).
    """
    implementation = _host_paged_attention_out if kv_cache.device.type == "cpu" else capture_safe_paged_attention_out
    implementation(
        query,
        key,
        value,
        kv_cache,
        slot_mapping,
        query_lens,
        seq_lens,
        block_tables,
        scale,
        sliding_window,
        out,
        token_offset,
    )


def host_pieces(
    query_lens: torch.Tensor, seq_lens: torch.Tensor, token_offset: int, num_rows: int
) -> tuple[list[tuple[int, int, int, int]], int]:
    """The sequences' parts among rows [token_offset, token_offset + num_rows) of the step, read on the host:
    (sequence, first row, end row, context length its last row sees) each, and the count of real rows
    (the rest are padding)."""
    lens = query_lens.tolist()
    contexts = seq_lens.tolist()
    low, high = token_offset, token_offset + num_rows
    pieces = []
    start = 0
    for s, n in enumerate(lens):
        first, last = max(start, low), min(start + n, high)
        if first < last:
            pieces.append((s, first - low, last - low, contexts[s] - n + (last - start)))
        start += n
    return pieces, max(min(start, high) - low, 0)


def _host_paged_attention_out(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int,
    out: torch.Tensor,
    token_offset: int = 0,
) -> None:
    """The CPU's paged_attention_out: reads the lengths on the host and attends over only the keys that
    exist, in one native decode call or one SDPA per sequence. Not capture-safe (nor meant to be)."""
    native = native_kernels() if kv_cache.device.type == "cpu" else None
    metadata = (slot_mapping, query_lens, seq_lens, block_tables)
    if native is not None and native.paged_decode_out(
        query, key, value, kv_cache, *metadata, scale, sliding_window, out, token_offset
    ):
        return  # a decode step, whole in one native call: the cache read in place, no gathered copy
    _store(key, value, kv_cache, slot_mapping)
    pieces, real_rows = host_pieces(query_lens, seq_lens, token_offset, query.shape[0])
    out[real_rows:].zero_()  # padding tokens
    if pieces and all(row1 - row0 == 1 and row0 == i for i, (_, row0, row1, _) in enumerate(pieces)):
        # Decode: rows 0..n-1 are one token each of n sequences.
        rows = len(pieces)
        tables = block_tables[[s for s, *_ in pieces]]
        lengths = [length for *_, length in pieces]
        if rows > 1:
            out[:rows] = _attend_decode_batch(query[:rows], kv_cache, tables, lengths, scale, sliding_window)
        else:
            out[:1] = _attend_one_sequence(query[:1], kv_cache, tables[0], lengths[0], scale, sliding_window)
        return
    for s, row0, row1, length in pieces:
        out[row0:row1] = _attend_one_sequence(
            query[row0:row1], kv_cache, block_tables[s], length, scale, sliding_window
        )


def paged_attention_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int,
    token_offset: int = 0,
) -> torch.Tensor:
    """Write the step's K/V into the cache, then attend causally over each sequence's context.

    query [T, H, D], key/value [T, Hkv, D]; returns [T, H, D]. ``sliding_window`` 0 means full
    attention; otherwise a query at position p sees keys at positions (p - window, p].
    ``token_offset``: see paged_attention_out_kernel, which also says where this is capture-safe.
    """
    out = torch.empty_like(query)
    paged_attention_out_kernel(
        query,
        key,
        value,
        kv_cache,
        slot_mapping,
        query_lens,
        seq_lens,
        block_tables,
        scale,
        sliding_window,
        out,
        token_offset,
    )
    return out


paged_attention = torch.library.custom_op("xllm::paged_attention", paged_attention_kernel, mutates_args=("kv_cache",))


@paged_attention.register_fake
def _(
    query, key, value, kv_cache, slot_mapping, query_lens, seq_lens, block_tables, scale, sliding_window, token_offset=0
):
    return torch.empty_like(query)


paged_attention_out = torch.library.custom_op(
    "xllm::paged_attention_out", paged_attention_out_kernel, mutates_args=("kv_cache", "out")
)


def capture_safe_paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int,
    token_offset: int = 0,
) -> torch.Tensor:
    """paged_attention's functional form over ``capture_safe_paged_attention_out``."""
    out = torch.empty_like(query)
    metadata = (slot_mapping, query_lens, seq_lens, block_tables)
    capture_safe_paged_attention_out(query, key, value, kv_cache, *metadata, scale, sliding_window, out, token_offset)
    return out


#: The capture-safe kernel of each op whose ops.KERNELS entry takes a host-side path on the CPU: what
#: CUDA and NPU graphs run where no fused kernel takes the op, and what the capture-safety audit checks.
CAPTURE_SAFE_KERNELS = {
    "xllm::paged_attention": capture_safe_paged_attention,
    "xllm::paged_attention_out": capture_safe_paged_attention_out,
}
