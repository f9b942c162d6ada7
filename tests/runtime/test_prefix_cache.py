"""Prefix caching: full blocks keyed by a chained hash, shared with reference counts, kept when released and
evicted least-recently-released first; requests that begin alike skip the shared part and answer the same."""

from __future__ import annotations

import pytest
import torch

import xllm_compiler
from tests.hf_oracle import mixed_prompts
from tests.runtime.conftest import SMALL_BUCKETS
from xllm_compiler.interface import RESERVED_BLOCKS
from xllm_compiler.runtime.kv_cache import BlockPool
from xllm_compiler.runtime.prefix_cache import PrefixCache
from xllm_compiler.runtime.requests import Request, SamplingParams

BLOCK = 4
PARAMS = SamplingParams(max_new_tokens=8, ignore_eos=True, return_logits=True)


@pytest.fixture(scope="module")
def artifact(checkpoints, llama):
    model_dir, _ = llama
    return checkpoints.artifact(model_dir, **{**SMALL_BUCKETS, "block_size": BLOCK})


@pytest.fixture(scope="module")
def prefix(llama):
    _, hf_model = llama
    return mixed_prompts(hf_model.config.vocab_size, lengths=(22,), seed=51)[0]  # 5 full blocks and 2 tokens


def continuations(vocab_size: int, *lengths: int) -> list[list[int]]:
    return mixed_prompts(vocab_size, lengths=lengths, seed=52)


def run(scheduler, prompts: list[list[int]]):
    """(tokens, first logits row) of each prompt, all added at once."""
    with torch.inference_mode():
        outputs = scheduler.run(Request(str(i), p, PARAMS) for i, p in enumerate(prompts))
    runs = [outputs[str(i)] for i in range(len(prompts))]
    return [[t for out in r for t in out.new_tokens] for r in runs], [
        next(o for o in r if o.new_tokens).logits for r in runs
    ]


def reference(artifact, prompts):
    return run(xllm_compiler.load(artifact).make_scheduler(enable_prefix_caching=False), prompts)


# -- BlockPool reference counts and PrefixCache keys -----------------------------------------------------------------


def test_a_shared_block_is_freed_only_by_its_last_holder():
    pool = BlockPool(4)
    (block,) = pool.allocate(1)
    pool.share(block)
    assert pool.refs(block) == 2 and pool.stats().used == 1
    pool.release([block])
    assert pool.refs(block) == 1 and pool.num_free() == 2  # still held: not handed out again
    assert block not in pool.allocate(2)
    pool.release([block])
    assert pool.refs(block) == 0 and pool.num_free() == 1


def test_cached_blocks_survive_release_and_are_evicted_oldest_first():
    pool = BlockPool(5)  # 4 usable blocks
    cache = PrefixCache(pool, BLOCK)
    a, b, c = pool.allocate(3)
    keys = [cache.block_hash(None, [i] * BLOCK) for i in range(3)]
    for key, block in zip(keys, (a, b, c), strict=True):
        cache.insert(key, block)
    pool.release([a])
    pool.release([b])
    pool.release([c])
    assert pool.stats().cached == 3 and pool.stats().used == 0 and pool.num_free() == 4
    evicted = []
    original = pool.on_evict

    def record(block: int) -> None:
        evicted.append(block)
        original(block)

    pool.on_evict = record
    assert pool.allocate(1) not in ([a], [b], [c])  # a never-cached block goes first
    assert cache.match([1] * BLOCK, 1)[0] == [b]  # b is held again: it cannot be evicted now
    assert len(pool.allocate(2)) == 2
    assert evicted == [a, c] and len(cache) == 1  # a was released first, then c; b survived
    assert pool.allocate(1) is None  # b is held: nothing left to evict


def test_keys_chain_over_every_block_before_and_the_seed():
    pool = BlockPool(8)
    cache = PrefixCache(pool, BLOCK, seed=b"artifact A")
    tokens = list(range(12))
    blocks = pool.allocate(3)
    parent = None
    for i, block in enumerate(blocks):
        parent = cache.block_hash(parent, tokens[i * BLOCK : (i + 1) * BLOCK])
        cache.insert(parent, block)
    assert cache.match(tokens, 3)[0] == blocks
    assert cache.match(tokens, 2)[0] == blocks[:2]
    assert cache.match([99, *tokens[1:]], 3)[0] == []  # a different first block: no later block matches either
    assert cache.match([*tokens[:4], 99, *tokens[5:]], 3)[0] == blocks[:1]
    other = PrefixCache(BlockPool(8), BLOCK, seed=b"artifact B")
    assert other.block_hash(None, tokens[:4]) != cache.block_hash(None, tokens[:4])


# -- through the scheduler -------------------------------------------------------------------------------------------


def test_a_shared_prefix_hits_and_answers_the_same(artifact, prefix):
    model = xllm_compiler.load(artifact)
    prompts = [prefix + tail for tail in continuations(model.vocab_size, 3, 9)]
    expected_tokens, expected_logits = reference(artifact, prompts)
    scheduler = model.make_scheduler()
    first = run(scheduler, prompts[:1])
    assert scheduler.stats()["prefix_cache_hits"] == 0
    second = run(scheduler, prompts[1:])
    stats = scheduler.stats()
    assert stats["prefix_cache_hits"] == len(prefix) // BLOCK * BLOCK  # the 5 full blocks of the prefix
    assert stats["prefix_cache_queries"] == len(prompts[0]) + len(prompts[1])
    assert stats["cached_blocks"] > 0 and stats["kv_blocks_used"] == 0
    assert first[0] + second[0] == expected_tokens
    for ours, theirs in zip(first[1] + second[1], expected_logits, strict=True):
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-5)
    # A prompt met before in full computes only its last token (its logits are what a step is for).
    again = model.make_scheduler()
    assert run(again, prompts[:1])[0] == expected_tokens[:1]
    assert again.stats()["prefix_cache_hits"] == (len(prompts[0]) - 1) // BLOCK * BLOCK


def test_requests_sharing_blocks_at_once_and_one_aborted(artifact, prefix):
    """Two requests hold the same prefix blocks; aborting one frees nothing the other still reads."""
    model = xllm_compiler.load(artifact)
    tails = continuations(model.vocab_size, 5, 2)
    prompts = [prefix + tails[0], prefix + tails[1]]
    expected_tokens, _ = reference(artifact, prompts)
    scheduler = model.make_scheduler()
    run(scheduler, [prefix])  # caches the prefix's blocks
    with torch.inference_mode():
        scheduler.add(Request("a", prompts[0], PARAMS))
        scheduler.add(Request("b", prompts[1], PARAMS))
        tokens = [t for out in scheduler.step() if out.request_id == "b" for t in out.new_tokens]
        shared = scheduler.running[0].blocks[: len(prefix) // BLOCK]
        assert shared == scheduler.running[1].blocks[: len(shared)]
        assert all(model.engine.pool.refs(block) == 2 for block in shared)
        scheduler.abort("a")
        assert all(model.engine.pool.refs(block) == 1 for block in shared)
        while scheduler.has_work():
            tokens += [t for out in scheduler.step() if out.request_id == "b" for t in out.new_tokens]
    assert tokens == expected_tokens[1]
    assert model.memory_stats()["kv_blocks_used"] == 0


def test_eviction_makes_room_and_answers_stay_the_same(artifact, prefix):
    """A pool of 12 blocks: other requests push the cached prefix out, least recently released first; the prefix
    then misses (in part) and is recomputed, with the same answers."""
    model = xllm_compiler.load(artifact, kv_blocks=12 + RESERVED_BLOCKS)
    others = continuations(model.vocab_size, 30, 26)
    prompts = [prefix, *others, prefix]
    expected_tokens, expected_logits = reference(artifact, prompts)
    scheduler = model.make_scheduler()
    tokens, logits = [], []
    for prompt in prompts:
        t, lg = run(scheduler, [prompt])
        tokens += t
        logits += lg
    assert tokens == expected_tokens
    for ours, theirs in zip(logits, expected_logits, strict=True):
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-5)
    stats = scheduler.stats()
    assert stats["prefix_cache_hits"] < len(prefix) // BLOCK * BLOCK  # the prefix was (partly) evicted
    assert stats["kv_blocks_used"] == 0 and 0 < stats["cached_blocks"] <= 12
    assert model.memory_stats()["kv_blocks_free"] == 12
