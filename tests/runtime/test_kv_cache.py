"""The paged KV cache: a small pool makes requests wait for blocks (never fail or change answers), a request the
pool can never hold is refused up front, blocks go back after every call; and the BlockPool allocator itself."""

from __future__ import annotations

import pytest
import torch

import xllm_compiler
from tests.hf_oracle import hf_greedy, mixed_prompts
from tests.runtime.conftest import SMALL_BUCKETS
from xllm_compiler.errors import KVCacheExhaustedError
from xllm_compiler.interface import RESERVED_BLOCKS
from xllm_compiler.runtime.kv_cache import BlockPool, KVCache
from xllm_compiler.runtime.platform.cpu import packable_dtypes

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def prompts(llama):
    _, hf_model = llama
    return mixed_prompts(hf_model.config.vocab_size, lengths=(10, 7, 9, 5, 8), seed=31)


def blocks_of(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def assert_all_blocks_free(model) -> None:
    memory = model.memory_stats()
    assert memory["kv_blocks_used"] == 0
    assert memory["kv_blocks_free"] == memory["kv_blocks_total"]


# -- a pool smaller than the batch -----------------------------------------------------------------------------


def test_requests_wait_for_blocks_and_give_the_same_answers(small_artifact, small_model, prompts):
    unconstrained = small_model.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    # Each request needs 2 blocks of 16 (<= 22 tokens); 4 usable blocks hold 2 requests at a time, not 5.
    assert all(blocks_of(len(p) + NEW_TOKENS, 16) == 2 for p in prompts)
    model = xllm_compiler.load(small_artifact, kv_blocks=4 + RESERVED_BLOCKS)
    assert model.memory_stats()["kv_blocks_total"] == 4
    assert model.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True) == unconstrained
    memory = model.memory_stats()
    assert memory["kv_blocks_peak"] == 4
    assert_all_blocks_free(model)
    assert torch.allclose(model.logits(prompts), small_model.logits(prompts), rtol=0, atol=1e-5)
    assert_all_blocks_free(model)


def test_one_request_at_a_time_pool(small_artifact, small_model, prompts):
    unconstrained = small_model.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    model = xllm_compiler.load(small_artifact, kv_blocks=2 + RESERVED_BLOCKS)
    assert model.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True) == unconstrained
    assert model.memory_stats()["kv_blocks_peak"] == 2
    assert_all_blocks_free(model)


def test_small_blocks_reused_across_requests_match_transformers(checkpoints, llama):
    """block_size 4: sequences span many blocks, which the pool hands out again as requests finish."""
    model_dir, hf_model = llama
    artifact = checkpoints.artifact(model_dir, **{**SMALL_BUCKETS, "block_size": 4})
    prompts = mixed_prompts(hf_model.config.vocab_size, lengths=(9, 14, 3, 20, 6), seed=32)
    model = xllm_compiler.load(artifact, kv_blocks=11 + RESERVED_BLOCKS)
    needed = [blocks_of(len(p) + 10, 4) for p in prompts]
    assert max(needed) <= 11 < sum(needed)
    assert model.generate(prompts, max_new_tokens=10, ignore_eos=True) == [hf_greedy(hf_model, p, 10) for p in prompts]
    assert_all_blocks_free(model)


def test_request_larger_than_the_pool_is_refused(small_artifact, small_model, prompts):
    model = xllm_compiler.load(small_artifact, kv_blocks=4 + RESERVED_BLOCKS)
    too_long = mixed_prompts(small_model.vocab_size, lengths=(50,), seed=33)[0]  # 50 + 20 tokens: 5 blocks > 4
    with pytest.raises(ValueError, match="KV blocks") as info:
        model.generate([too_long], max_new_tokens=20)
    assert isinstance(info.value, KVCacheExhaustedError)
    # Refused up front, with other requests in the same call too; nothing is held afterwards.
    with pytest.raises(ValueError, match="KV blocks"):
        model.generate([prompts[0], too_long], max_new_tokens=20)
    assert_all_blocks_free(model)
    assert model.memory_stats()["kv_blocks_peak"] == 0
    # The model still serves what fits, up to exactly the whole pool: 50 + 14 tokens are 4 blocks, 50 + 15 are 5.
    expected = small_model.generate([too_long, prompts[0]], max_new_tokens=14, ignore_eos=True)
    assert model.generate([too_long, prompts[0]], max_new_tokens=14, ignore_eos=True) == expected
    assert model.memory_stats()["kv_blocks_peak"] == 4
    with pytest.raises(ValueError, match="KV blocks"):
        model.generate([too_long], max_new_tokens=15)
    assert_all_blocks_free(model)


def test_memory_stats_after_generate(small_artifact, prompts):
    model = xllm_compiler.load(small_artifact)
    memory = model.memory_stats()
    spec = model.manifest.model
    # Default pool: the largest decode bucket (2) of max_seq_len (128) sequences, in blocks of 16, + block 0.
    num_blocks = 2 * blocks_of(128, 16) + RESERVED_BLOCKS
    assert memory["kv_blocks_total"] == num_blocks - RESERVED_BLOCKS
    assert memory["kv_cache_bytes"] == num_blocks * KVCache.bytes_per_block(
        spec.num_layers, 16, spec.num_kv_heads, spec.head_dim, torch.float32
    )
    assert memory["kv_blocks_peak"] == 0
    model.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert_all_blocks_free(model)
    assert 0 < model.memory_stats()["kv_blocks_peak"] <= memory["kv_blocks_total"]


@pytest.mark.parametrize("kv_blocks", [0, 1, -3, True, 2.5])
def test_bad_kv_blocks_are_refused(small_artifact, kv_blocks):
    with pytest.raises(ValueError, match="kv_blocks"):
        xllm_compiler.load(small_artifact, kv_blocks=kv_blocks)


# -- BlockPool -------------------------------------------------------------------------------------------------


def test_block_pool_never_hands_out_the_reserved_block():
    pool = BlockPool(6)
    assert pool.capacity == 5
    blocks = pool.allocate(5)
    assert sorted(blocks) == [1, 2, 3, 4, 5]
    assert 0 not in blocks
    assert pool.allocate(1) is None
    pool.release(blocks)
    again = [b for _ in range(5) for b in pool.allocate(1)]
    assert sorted(again) == [1, 2, 3, 4, 5]


def test_block_pool_allocation_is_all_or_nothing():
    pool = BlockPool(5)
    first = pool.allocate(3)
    assert len(first) == len(set(first)) == 3
    assert pool.allocate(2) is None  # only 1 free: nothing taken
    assert pool.num_free() == 1
    assert pool.allocate(0) == []
    last = pool.allocate(1)
    assert not set(first) & set(last)
    assert pool.num_free() == 0


def test_block_pool_release_and_peak():
    pool = BlockPool(9)
    assert pool.stats().peak_used == 0
    a = pool.allocate(3)
    b = pool.allocate(4)
    stats = pool.stats()
    assert (stats.total, stats.used, stats.free, stats.peak_used) == (8, 7, 1, 7)
    pool.release(a)
    stats = pool.stats()
    assert (stats.used, stats.free, stats.peak_used) == (4, 4, 7)
    c = pool.allocate(4)
    assert not set(b) & set(c)
    pool.release(b)
    pool.release(c)
    stats = pool.stats()
    assert (stats.used, stats.free, stats.peak_used) == (0, 8, 8)


@pytest.mark.parametrize("num_blocks", [0, 1])
def test_block_pool_needs_more_than_the_reserved_blocks(num_blocks):
    with pytest.raises(ValueError):
        BlockPool(num_blocks)


def test_kv_cache_layer_views_share_one_tensor():
    cache = KVCache(3, 5, 4, 2, 8, torch.float32, torch.device("cpu"))
    assert cache.tensor.shape == (3, 2, 5, 4, 2, 8)
    assert len(cache.layers) == 3
    cache.layers[1][0, 2, 3] = 7.0
    assert cache.tensor[1, 0, 2, 3].eq(7.0).all()
    assert cache.nbytes() == 5 * KVCache.bytes_per_block(3, 4, 2, 8, torch.float32)


def test_blocks_are_zeroed_when_first_handed_out_not_before():
    cache = KVCache(2, 8, 4, 1, 2, torch.float32, torch.device("cpu"))
    assert cache.tensor[:, :, :RESERVED_BLOCKS].eq(0).all()
    cache.tensor[:, :, RESERVED_BLOCKS:] = float("nan")  # what uninitialised memory may hold
    first_uses = []

    def zero(start: int, stop: int) -> None:
        first_uses.append((start, stop))
        cache.zero_blocks(start, stop)

    pool = BlockPool(8, on_first_use=zero)
    a = pool.allocate(2)
    assert first_uses == [(1, 3)] and cache.tensor[:, :, 1:3].eq(0).all()
    cache.tensor[:, :, a] = 5.0
    pool.release(a)
    b = pool.allocate(3)  # the two released blocks come back first, already written: not zeroed again
    assert sorted(b) == [1, 2, 3] and first_uses == [(1, 3), (3, 4)]
    assert cache.tensor[:, :, 1:3].eq(5.0).all() and cache.tensor[:, :, 3].eq(0).all()
    assert cache.tensor[:, :, 4:].isnan().all()


@pytest.mark.skipif(not packable_dtypes(), reason="this build packs no linear layers")
def test_loaded_model_keeps_only_the_packed_copy_of_a_linear_weight(small_artifact):
    model = xllm_compiler.load(small_artifact)
    weights = model.engine.graphs._weights
    packed = {name.removesuffix("_packed") for name in weights if name.endswith("_packed")}
    assert packed, "no linear weight was packed"
    assert not packed & set(weights), "a plain weight stayed beside its packed copy"
