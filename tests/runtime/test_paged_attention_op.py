"""``torch.ops.xllm.paged_attention`` against a plain reference: per-sequence causal softmax attention (GQA, optional
sliding window) over the whole context, computed with explicit matmuls, with the context's K/V scattered over
random, non-contiguous cache blocks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import xllm_compiler.ops  # noqa: F401  (registers torch.ops.xllm.*)
from xllm_compiler.interface import PAD_SLOT, RESERVED_BLOCKS

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 8
BLOCK_SIZE, NUM_BLOCKS = 4, 40
SCALE = 0.3


def reference_attention(query, keys, values, scale, sliding_window):
    """query [n, H, D] for the last n of L positions; keys/values [L, Hkv, D] -> [n, H, D]."""
    n, L = query.shape[0], keys.shape[0]
    group = query.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1).permute(1, 2, 0)  # [H, D, L]
    v = values.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, L, D]
    scores = torch.matmul(query.transpose(0, 1), k) * scale  # [H, n, L]
    query_pos = torch.arange(L - n, L)[:, None]
    key_pos = torch.arange(L)[None, :]
    allowed = key_pos <= query_pos
    if sliding_window > 0:
        allowed &= key_pos > query_pos - sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).transpose(0, 1)


@dataclass
class Case:
    args: tuple
    expected: torch.Tensor
    cache_before: torch.Tensor
    written: dict[int, tuple[torch.Tensor, torch.Tensor]]  # slot -> (key, value) the op must store
    num_real_tokens: int


def make_case(
    lengths: list[tuple[int, int]], pad_tokens: int = 0, sliding_window: int = 0, seed: int = 0, pad_seqs: int = 0
) -> Case:
    """``lengths``: (seq_len, query_len) per sequence, (0, 0) for a padding sequence; seq_len - query_len tokens
    are already cached. ``pad_seqs`` more (0, 0) sequences go at the end; ``pad_tokens`` padding tokens too."""
    g = torch.Generator().manual_seed(seed)
    lengths = [*lengths, *[(0, 0)] * pad_seqs]
    cache = torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=g)
    free = (torch.randperm(NUM_BLOCKS - RESERVED_BLOCKS, generator=g) + RESERVED_BLOCKS).tolist()
    max_blocks = max(-(-s // BLOCK_SIZE) for s, _ in lengths) + 1
    block_tables = torch.zeros(len(lengths), max_blocks, dtype=torch.int32)
    queries, keys, values, slots, expected = [], [], [], [], []
    written = {}
    for row, (seq_len, query_len) in enumerate(lengths):
        blocks = [free.pop() for _ in range(-(-seq_len // BLOCK_SIZE))]
        block_tables[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        context_k = torch.randn(seq_len, NUM_KV_HEADS, HEAD_DIM, generator=g)
        context_v = torch.randn(seq_len, NUM_KV_HEADS, HEAD_DIM, generator=g)
        query = torch.randn(query_len, NUM_HEADS, HEAD_DIM, generator=g)
        for pos in range(seq_len):
            block, offset = blocks[pos // BLOCK_SIZE], pos % BLOCK_SIZE
            if pos < seq_len - query_len:  # already cached
                cache[0, block, offset] = context_k[pos]
                cache[1, block, offset] = context_v[pos]
            else:
                slot = block * BLOCK_SIZE + offset
                slots.append(slot)
                written[slot] = (context_k[pos], context_v[pos])
        queries.append(query)
        keys.append(context_k[seq_len - query_len :])
        values.append(context_v[seq_len - query_len :])
        if query_len:
            expected.append(reference_attention(query, context_k, context_v, SCALE, sliding_window))
    num_real = len(slots)
    queries.append(torch.randn(pad_tokens, NUM_HEADS, HEAD_DIM, generator=g))
    keys.append(torch.randn(pad_tokens, NUM_KV_HEADS, HEAD_DIM, generator=g))
    values.append(torch.randn(pad_tokens, NUM_KV_HEADS, HEAD_DIM, generator=g))
    slots += [PAD_SLOT] * pad_tokens
    expected.append(torch.zeros(pad_tokens, NUM_HEADS, HEAD_DIM))
    args = (
        torch.cat(queries),
        torch.cat(keys),
        torch.cat(values),
        cache,
        torch.tensor(slots, dtype=torch.int64),
        torch.tensor([q for _, q in lengths], dtype=torch.int32),
        torch.tensor([s for s, _ in lengths], dtype=torch.int32),
        block_tables,
        SCALE,
        sliding_window,
    )
    return Case(args, torch.cat(expected), cache.clone(), written, num_real)


def run_and_check(case: Case) -> None:
    out = torch.ops.xllm.paged_attention(*case.args)
    cache = case.args[3]
    assert out.shape == case.args[0].shape
    torch.testing.assert_close(out, case.expected, rtol=1e-5, atol=1e-5)
    # Padding tokens give exactly zero.
    assert out[case.num_real_tokens :].eq(0).all()
    # The cache: the new tokens' K/V at their slots, padding only in the reserved slot, nothing else touched.
    expected_cache = case.cache_before.clone()
    flat = expected_cache.view(2, -1, NUM_KV_HEADS, HEAD_DIM)
    for slot, (k, v) in case.written.items():
        flat[0, slot], flat[1, slot] = k, v
    if case.num_real_tokens < case.args[0].shape[0]:
        actual_flat = cache.view(2, -1, NUM_KV_HEADS, HEAD_DIM)
        flat[:, PAD_SLOT] = actual_flat[:, PAD_SLOT]  # whatever a padding token wrote there
    assert torch.equal(cache, expected_cache)


def test_prefill_one_sequence():
    run_and_check(make_case([(13, 13)]))


def test_prefill_several_sequences():
    run_and_check(make_case([(5, 5), (1, 1), (9, 9), (16, 16)], seed=1))


def test_chunked_prefill_with_context_in_cache():
    run_and_check(make_case([(11, 4), (20, 7), (6, 1), (9, 9)], seed=2))


def test_decode_batch():
    run_and_check(make_case([(7, 1), (1, 1), (16, 1), (13, 1), (3, 1)], seed=3))


def test_decode_single_sequence():
    run_and_check(make_case([(10, 1)], seed=4))


@pytest.mark.parametrize("window", [1, 3, 5, 64])
@pytest.mark.parametrize(
    "lengths",
    [
        [(12, 12)],
        [(10, 10), (3, 3)],
        [(15, 5), (8, 2)],
        [(9, 1), (2, 1), (14, 1)],
        [(11, 1)],
    ],
    ids=["prefill", "prefill-batch", "chunked", "decode-batch", "decode-one"],
)
def test_sliding_window(lengths, window):
    run_and_check(make_case(lengths, sliding_window=window, seed=5))


@pytest.mark.parametrize(
    "lengths",
    [[(9, 9), (4, 4)], [(12, 3)], [(6, 1), (10, 1), (3, 1)], [(7, 1)]],
    ids=["prefill", "chunked", "decode-batch", "decode-one"],
)
@pytest.mark.parametrize("sliding_window", [0, 4])
def test_padding_tokens_give_zero_and_write_only_the_reserved_slot(lengths, sliding_window):
    run_and_check(make_case(lengths, pad_tokens=5, sliding_window=sliding_window, seed=6))


@pytest.mark.parametrize(
    "lengths",
    [[(9, 9)], [(12, 3), (5, 5)], [(6, 1), (10, 1), (3, 1)], [(7, 1)]],
    ids=["prefill", "chunked", "decode-batch", "decode-one"],
)
def test_zero_length_padding_sequences(lengths):
    run_and_check(make_case(lengths, pad_tokens=2, pad_seqs=3, seed=7))


def test_zero_length_sequence_between_real_ones():
    run_and_check(make_case([(5, 5), (0, 0), (8, 3)], seed=8))
    run_and_check(make_case([(5, 1), (0, 0), (8, 1)], seed=9))


def test_only_padding():
    run_and_check(make_case([], pad_tokens=3, pad_seqs=2, seed=10))


def test_write_kv_cache_op():
    g = torch.Generator().manual_seed(11)
    cache = torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=g)
    before = cache.clone()
    slots = torch.tensor([37, 5, 100, 6], dtype=torch.int64)
    key = torch.randn(4, NUM_KV_HEADS, HEAD_DIM, generator=g)
    value = torch.randn(4, NUM_KV_HEADS, HEAD_DIM, generator=g)
    torch.ops.xllm.write_kv_cache(key, value, cache, slots)
    for i, slot in enumerate(slots.tolist()):
        block, offset = divmod(slot, BLOCK_SIZE)
        assert torch.equal(cache[0, block, offset], key[i])
        assert torch.equal(cache[1, block, offset], value[i])
        before[:, block, offset] = cache[:, block, offset]
    assert torch.equal(cache, before)
