"""Speculative decoding changes no result: greedy tokens equal plain decoding's on every architecture, whatever
is proposed and kept; sampled tokens keep the target's distribution; the KV pool gets every block back.

Random tiny models rarely repeat themselves, so n-gram lookups seldom hit on them: most tests propose through an
oracle that knows the plain greedy continuation and gets every third token wrong, so that verify steps keep some
proposals, reject others and take bonus tokens, deterministically.
"""

from __future__ import annotations

import pytest
import torch

import xllm_compiler
from tests.hf_oracle import ARCHITECTURE_CONFIGS, MOE_ARCHITECTURE_CONFIGS, mixed_prompts
from xllm_compiler.errors import RequestError
from xllm_compiler.runtime.requests import Request, SamplingParams
from xllm_compiler.runtime.speculative import AcceptanceGate, Proposal
from xllm_compiler.runtime.step import Sequence

BLOCK_SIZE = 8  # small blocks: verify steps cross block edges
OPTIONS = dict(decode_buckets=[1, 2, 4], prefill_buckets=[16, 64], max_seq_len=96, block_size=BLOCK_SIZE)
LENGTHS = (5, 1, 12, 17)  # prompts that end mid-block, on an edge and one token past it
MAX_NEW = (12, 7, 10, 4)  # sequences finish at different steps


class Oracle:
    """Proposes the plain greedy continuation of each prompt, wrong at every third position."""

    def __init__(self, num_tokens: int, continuations: dict[tuple[int, ...], list[int]], vocab_size: int):
        self.num_tokens = num_tokens
        self.continuations = continuations
        self.vocab_size = vocab_size
        self.settled: list[tuple[int, int]] = []

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[Proposal]:
        proposals = []
        for seq, limit in zip(seqs, limits, strict=True):
            done = len(seq.generated)
            right = self.continuations[tuple(seq.tokens[: seq.prompt_len])][done : done + limit]
            proposals.append(
                Proposal([(t + 1) % self.vocab_size if (done + i) % 3 == 2 else t for i, t in enumerate(right)])
            )
        return proposals

    def settle(self, seq: Sequence, proposed: int, kept: int) -> None:
        self.settled.append((proposed, kept))

    def release(self, seq: Sequence) -> None:
        pass


def run(model, prompts, max_new, speculator=None, **limits) -> list[list[int]]:
    scheduler = model.make_scheduler(speculator=speculator, **limits)
    requests = [
        Request(str(i), p, SamplingParams(max_new_tokens=n, ignore_eos=True))
        for i, (p, n) in enumerate(zip(prompts, max_new, strict=True))
    ]
    outputs = scheduler.run(requests)
    return [[t for out in outputs[str(i)] for t in out.new_tokens] for i in range(len(prompts))]


def check_unchanged(model, prompts, max_new, k: int, **limits) -> Oracle:
    plain = run(model, prompts, max_new, **limits)
    oracle = Oracle(k, {tuple(p): out for p, out in zip(prompts, plain, strict=True)}, model.vocab_size)
    assert run(model, prompts, max_new, oracle, **limits) == plain
    assert any(kept for _, kept in oracle.settled) and any(kept < proposed for proposed, kept in oracle.settled)
    assert model.memory_stats()["kv_blocks_used"] == 0
    return oracle


@pytest.mark.parametrize("architecture", sorted({**ARCHITECTURE_CONFIGS, **MOE_ARCHITECTURE_CONFIGS}))
def test_greedy_tokens_are_unchanged_on_every_architecture(checkpoints, architecture):
    model_dir, hf_model = checkpoints.checkpoint(architecture)
    model = xllm_compiler.load(checkpoints.artifact(model_dir, num_speculative_tokens=3, **OPTIONS))
    check_unchanged(model, mixed_prompts(hf_model.config.vocab_size, lengths=LENGTHS, seed=7), MAX_NEW, k=3)
    assert model.stats().get("fallbacks", 0) == 0  # every verify step found a verify or decode bucket


@pytest.fixture(scope="module")
def llama_dir(checkpoints):
    return checkpoints.checkpoint("LlamaForCausalLM")


@pytest.fixture(scope="module")
def llama(checkpoints, llama_dir):
    model_dir, _ = llama_dir
    return xllm_compiler.load(checkpoints.artifact(model_dir, num_speculative_tokens=3, **OPTIONS))


@pytest.fixture(scope="module")
def prompts(llama):
    return mixed_prompts(llama.vocab_size, lengths=LENGTHS, seed=7)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_tokens_are_unchanged_for_each_k(llama, prompts, k):
    check_unchanged(llama, prompts, MAX_NEW, k)


def test_greedy_tokens_are_unchanged_on_the_fallback_graph(checkpoints, llama_dir, prompts):
    """Decode buckets of 1 and 2 rows only and no verify buckets: verify steps run on the dynamic graph."""
    model_dir, _ = llama_dir
    options = {**OPTIONS, "decode_buckets": [1, 2]}
    model = xllm_compiler.load(checkpoints.artifact(model_dir, **options))
    check_unchanged(model, prompts, MAX_NEW, k=3)
    assert model.stats()["fallbacks"] > 0


def test_generate_with_ngram_and_with_a_draft_matches_plain_generate(checkpoints, llama, llama_dir, prompts):
    # A prompt that repeats itself, so that lookups hit; the model's own greedy text may repeat too.
    repeating = [5, 9, 14, 3, 5, 9, 14, 3, 5, 9]
    batch = [*prompts, repeating]
    plain = llama.generate(batch, max_new_tokens=12, ignore_eos=True)
    before = llama.stats()["speculative"]["verify_steps"]
    assert llama.generate(batch, max_new_tokens=12, ignore_eos=True, speculative="ngram") == plain
    assert llama.stats()["speculative"]["verify_steps"] > before

    model_dir, _ = llama_dir
    draft = xllm_compiler.load(checkpoints.artifact(model_dir, **OPTIONS))  # the same weights: all accepted
    for k in (1, 4):
        assert llama.generate(batch, 12, ignore_eos=True, speculative=draft, num_speculative_tokens=k) == plain
    stats = llama.stats()["speculative"]
    assert stats["accepted"] > 0 and 1 <= stats["mean_accepted_length"] <= 5
    assert draft.memory_stats()["kv_blocks_used"] == 0 and llama.memory_stats()["kv_blocks_used"] == 0


def test_a_draft_with_another_vocabulary_is_refused(checkpoints, llama, prompts):
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM", vocab_size=128)
    other = xllm_compiler.load(checkpoints.artifact(model_dir, **OPTIONS))
    with pytest.raises(RequestError, match="vocabulary"):
        llama.generate(prompts, 4, speculative=other)
    with pytest.raises(RequestError, match="speculative must be"):
        llama.generate(prompts, 4, speculative="medusa")
    with pytest.raises(RequestError, match="num_speculative_tokens"):
        llama.generate(prompts, 4, speculative="ngram", num_speculative_tokens=0)


def test_blocks_filled_by_verify_steps_are_keyed_by_their_tokens(checkpoints, llama_dir, llama):
    """The prefix cache keys a block when it is full; after a verify step the kept proposals are in its K/V
    before they are appended to the sequence, and must be what the key is made of: a prompt that repeats a
    speculative request's text then finds every full block of it cached (in a model where only that
    request ran, so no plain run could have keyed the blocks instead)."""
    prompt = mixed_prompts(llama.vocab_size, lengths=(5,), seed=11)[0]
    reference = run(llama, [prompt], (28,))[0]
    model_dir, _ = llama_dir
    fresh = xllm_compiler.load(checkpoints.artifact(model_dir, num_speculative_tokens=3, **OPTIONS))
    oracle = Oracle(3, {tuple(prompt): reference}, fresh.vocab_size)
    assert run(fresh, [prompt], (28,), oracle) == [reference]
    again = prompt + reference[:27]  # 32 tokens: the first three blocks full and cached
    scheduler = fresh.make_scheduler()
    scheduler.run([Request("again", again, SamplingParams(max_new_tokens=1, ignore_eos=True))])
    assert scheduler.stats()["prefix_cache_hits"] == (len(again) - 1) // BLOCK_SIZE * BLOCK_SIZE


def test_a_request_at_max_seq_len_never_writes_past_its_blocks(llama):
    """prompt + max_new_tokens == max_seq_len: proposals never reach past the generation's last token."""
    prompt = mixed_prompts(llama.vocab_size, lengths=(OPTIONS["max_seq_len"] - 6,), seed=3)
    oracle = check_unchanged(llama, prompt, (6,), k=5)
    assert all(proposed <= 5 for proposed, _ in oracle.settled)
    assert llama.memory_stats()["kv_blocks_used"] == 0


def test_the_pool_gets_every_block_back_after_many_requests(llama):
    start = llama.memory_stats()["kv_blocks_used"]
    for seed in range(6):
        batch = mixed_prompts(llama.vocab_size, lengths=(3 + seed, 11, 30 - seed), seed=seed)
        llama.generate(batch, max_new_tokens=9, temperature=0.7, seed=seed, speculative="ngram")
    assert llama.memory_stats()["kv_blocks_used"] == start


def test_proposals_that_keep_failing_pause_speculation():
    gate = AcceptanceGate(min_rate=0.2, warmup=4, pause=8)
    seq = Sequence(tokens=[1, 2], prompt_len=2)
    for _ in range(4):
        assert gate.allows(seq)
        gate.settle(seq, proposed=3, kept=0)
    assert [gate.allows(seq) for _ in range(9)] == [False] * 8 + [True]
    gate.settle(seq, proposed=3, kept=0)  # one failed retry pauses again, for twice as long
    assert [gate.allows(seq) for _ in range(17)] == [False] * 16 + [True]
    gate.release(seq)
    assert gate.allows(seq)


def test_proposals_that_hit_keep_speculation_on():
    gate = AcceptanceGate()
    seq = Sequence(tokens=[1, 2], prompt_len=2)
    for _ in range(20):
        gate.settle(seq, proposed=3, kept=2)
        assert gate.allows(seq)


# -- sampling keeps the target's distribution ----------------------------------------------------------------

DRAWS = 3000
VOCAB = 16


class FixedGuess:
    """Always proposes the same tokens (a point mass, as a lookup does)."""

    num_tokens = 2

    def propose(self, seqs, limits):
        return [Proposal([3, 7][:limit]) for limit in limits]

    def settle(self, seq, proposed, kept):
        pass

    def release(self, seq):
        pass


def _sampled_tokens(model, prompt, speculator) -> tuple[torch.Tensor, dict]:
    """[DRAWS, 3]: the first three sampled tokens of DRAWS seeded requests of ``prompt``; the scheduler's stats."""
    scheduler = model.make_scheduler(max_num_seqs=256, speculator=speculator)
    params = [SamplingParams(max_new_tokens=3, temperature=1.0, seed=s, ignore_eos=True) for s in range(DRAWS)]
    outputs = scheduler.run(Request(str(s), list(prompt), p) for s, p in enumerate(params))
    tokens = [[t for out in outputs[str(s)] for t in out.new_tokens] for s in range(DRAWS)]
    return torch.tensor(tokens), scheduler.stats()


def _total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    pa = torch.bincount(a, minlength=VOCAB).double() / len(a)
    pb = torch.bincount(b, minlength=VOCAB).double() / len(b)
    return 0.5 * float((pa - pb).abs().sum())


def test_sampled_tokens_keep_the_targets_distribution(checkpoints):
    """The second and third tokens come from verify steps (the first from the prefill). Two samples of 3,000
    from one distribution over 16 tokens differ by a total variation of about 0.035; a rule that kept
    proposals too often would move mass onto tokens 3 and 7 by far more."""
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM", vocab_size=VOCAB)
    model = xllm_compiler.load(checkpoints.artifact(model_dir, **OPTIONS))
    prompt = [1, 4, 9, 2, 11]
    plain, _ = _sampled_tokens(model, prompt, None)
    speculative, stats = _sampled_tokens(model, prompt, FixedGuess())
    assert 0 < stats["accepted_tokens"] < stats["proposed_tokens"]
    for position in (1, 2):
        assert _total_variation(plain[:, position], speculative[:, position]) < 0.07
    assert model.memory_stats()["kv_blocks_used"] == 0
