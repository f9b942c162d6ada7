"""Buckets are a speed choice, never a limit: steps larger than every bucket run on the fallback graph and give
transformers' answers; steps that fit a bucket run on it, and the scheduler's defaults keep steps inside the
buckets (long prompts are prefilled in chunks). Plus the bucket policy and the scheduler's batching."""

from __future__ import annotations

import pytest
import torch

import xllm_compiler
from tests.hf_oracle import hf_greedy, hf_last_logits, mixed_prompts
from tests.runtime.conftest import SMALL_BUCKETS
from xllm_compiler.buckets.policy import DECODE, PREFILL, Bucket, make_buckets
from xllm_compiler.errors import OptionsError
from xllm_compiler.runtime.requests import Request, SamplingParams

NEW_TOKENS = 12
LARGEST_PREFILL = 16


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def check_against_transformers(model, hf_model, prompts, new_tokens=NEW_TOKENS) -> None:
    ours = model.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
    assert ours == [hf_greedy(hf_model, p, new_tokens) for p in prompts]
    assert relative_error(model.logits(prompts), hf_last_logits(hf_model, prompts)) < 1e-4


def scheduled_greedy(model, prompts, new_tokens, **limits) -> list[list[int]]:
    """Greedy tokens of ``prompts`` through a scheduler with ``limits`` larger than the buckets: the steps that
    overflow them run on the fallback graph."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    with torch.inference_mode():
        outputs = model.make_scheduler(**limits).run(Request(str(i), p, params) for i, p in enumerate(prompts))
    return [[t for out in outputs[str(i)] for t in out.new_tokens] for i in range(len(prompts))]


# -- through the model: correct whatever the bucket fit --------------------------------------------------------


@pytest.mark.parametrize("length", [15, 16, 17, 50])
def test_one_prompt_around_the_prefill_bucket_edge(small_artifact, llama, length):
    _, hf_model = llama
    prompt = mixed_prompts(hf_model.config.vocab_size, lengths=(length,), seed=length)[0]
    expected = [hf_greedy(hf_model, prompt, NEW_TOKENS)]
    model = xllm_compiler.load(small_artifact)
    assert model.generate([prompt], max_new_tokens=NEW_TOKENS, ignore_eos=True) == expected
    stats = model.stats()
    assert stats.get("fallbacks", 0) == 0
    if length <= LARGEST_PREFILL:
        # One prefill on prefill_16 (padded up to 16 tokens), then one decode step per token on decode_1.
        assert bucket_steps(stats) == NEW_TOKENS
        assert stats["misses"] == 2  # each of prefill_16 and decode_1 is built once, then resident
        assert stats["padded_tokens"] == LARGEST_PREFILL - length
    else:
        # Prefilled in chunks of 16 on prefill_16 (a last chunk of one token runs as a decode); the last chunk
        # yields the first token.
        assert bucket_steps(stats) == -(-length // LARGEST_PREFILL) + NEW_TOKENS - 1
    assert relative_error(model.logits([prompt]), hf_last_logits(hf_model, [prompt])) < 1e-4
    if length > LARGEST_PREFILL:
        # With a step budget above every bucket, the prompt runs whole on the fallback graph: the same answers.
        model = xllm_compiler.load(small_artifact)
        assert scheduled_greedy(model, [prompt], NEW_TOKENS, max_num_batched_tokens=64) == expected
        stats = model.stats()
        assert stats["fallbacks"] == 1  # the prompt fits no prefill bucket
        assert bucket_steps(stats) == NEW_TOKENS - 1  # its decode steps still fit decode_1


def test_batch_larger_than_every_decode_bucket(small_artifact, llama):
    _, hf_model = llama
    prompts = mixed_prompts(hf_model.config.vocab_size, lengths=(3, 9, 1, 12, 6), seed=11)
    expected = [hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]
    model = xllm_compiler.load(small_artifact)
    assert model.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True) == expected
    assert model.stats().get("fallbacks", 0) == 0  # by default at most 2 sequences (decode_2) run at once
    assert relative_error(model.logits(prompts), hf_last_logits(hf_model, prompts)) < 1e-4
    model = xllm_compiler.load(small_artifact)
    assert scheduled_greedy(model, prompts, NEW_TOKENS, max_num_seqs=5) == expected
    stats = model.stats()
    assert stats.get("fallbacks", 0) > 0  # 5 sequences decoding together fit no decode bucket (max 2)
    assert bucket_steps(stats) > 0  # the first prefill (<= 2 prompts, <= 16 tokens) fits prefill_16


def test_batch_of_every_edge_length_together(small_model, llama):
    _, hf_model = llama
    prompts = mixed_prompts(hf_model.config.vocab_size, lengths=(15, 16, 17, 50, 1, 2), seed=12)
    check_against_transformers(small_model, hf_model, prompts, new_tokens=8)


def test_steps_that_fit_buckets_never_fall_back(small_artifact, llama):
    _, hf_model = llama
    prompts = mixed_prompts(hf_model.config.vocab_size, lengths=(6, 9), seed=13)
    model = xllm_compiler.load(small_artifact)
    ours = model.generate(prompts, max_new_tokens=8, ignore_eos=True)
    stats = model.stats()
    assert stats.get("fallbacks", 0) == 0
    assert bucket_steps(stats) == 8  # one prefill of both prompts (15 tokens <= 16), then 7 decode steps on decode_2
    assert ours == [hf_greedy(hf_model, p, 8) for p in prompts]


def test_prompt_filling_max_seq_len(small_model, llama):
    _, hf_model = llama
    prompt = mixed_prompts(hf_model.config.vocab_size, lengths=(small_model.max_seq_len - 8,), seed=14)[0]
    assert small_model.generate([prompt], max_new_tokens=8, ignore_eos=True) == [hf_greedy(hf_model, prompt, 8)]
    with pytest.raises(ValueError, match="max_seq_len"):
        small_model.generate([prompt], max_new_tokens=9)


def test_padded_decode_bucket(checkpoints, llama):
    """decode_buckets=[4]: 1 or 3 sequences decode in decode_4 with padding tokens and padding sequences."""
    model_dir, hf_model = llama
    artifact = checkpoints.artifact(model_dir, decode_buckets=[4], prefill_buckets=[8, 32], max_seq_len=128)
    prompts = mixed_prompts(hf_model.config.vocab_size, lengths=(5, 1, 23), seed=16)
    expected = [hf_greedy(hf_model, p, 10) for p in prompts]
    for batch, padded in [(prompts, (32 - 29) + 9 * 1), (prompts[:1], (8 - 5) + 9 * 3)]:
        model = xllm_compiler.load(artifact)
        assert model.generate(batch, max_new_tokens=10, ignore_eos=True) == expected[: len(batch)]
        graph_counters = {k: v for k, v in model.stats().items() if k != "speculative"}
        assert graph_counters == {"steps": 10, "hits": 8, "misses": 2, "padded_tokens": padded}


def test_sliding_window_model_past_its_window(checkpoints):
    """Mistral with a 16-token window, small buckets and blocks of 4: prompts and generations run past the
    window on bucket and fallback graphs alike."""
    model_dir, hf_model = checkpoints.checkpoint("MistralForCausalLM")
    artifact = checkpoints.artifact(model_dir, **{**SMALL_BUCKETS, "block_size": 4})
    model = xllm_compiler.load(artifact)
    prompts = mixed_prompts(hf_model.config.vocab_size, lengths=(50, 15, 3), seed=17)
    check_against_transformers(model, hf_model, prompts)
    assert bucket_steps(model.stats()) > 0
    model = xllm_compiler.load(artifact)
    wide = scheduled_greedy(model, prompts, NEW_TOKENS, max_num_seqs=3, max_num_batched_tokens=128)
    assert wide == [hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]
    assert model.stats()["fallbacks"] == model.stats()["steps"]  # 3 sequences a step: no bucket holds them


# -- the graph cache's choice ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "num_tokens", "num_seqs", "graph", "padded_to"),
    [
        (DECODE, 1, 1, "decode_1", (1, 1)),
        (DECODE, 2, 2, "decode_2", (2, 2)),
        (DECODE, 3, 3, "dynamic", (3, 3)),
        (PREFILL, 5, 1, "prefill_16", (16, 2)),
        (PREFILL, 16, 2, "prefill_16", (16, 2)),
        (PREFILL, 17, 1, "dynamic", (17, 1)),
        (PREFILL, 10, 3, "dynamic", (10, 3)),
    ],
)
def test_graph_cache_picks_smallest_fitting_bucket_else_exact_fallback(
    small_artifact, phase, num_tokens, num_seqs, graph, padded_to
):
    graphs = xllm_compiler.load(small_artifact).engine.graphs
    choice = graphs.choose(phase, num_tokens, num_seqs)
    assert (choice.graph, choice.num_tokens, choice.num_seqs) == (graph, *padded_to)
    assert graphs.counters["fallbacks" if graph == "dynamic" else "misses"] == 1  # a bucket graph not yet built


def bucket_steps(stats: dict[str, int]) -> int:
    """Steps that ran on a bucket graph, resident already (hit) or built for them (miss)."""
    return stats.get("hits", 0) + stats.get("misses", 0)


def test_make_buckets():
    buckets = make_buckets((1, 2), (4, 16), max_seq_len=128, explicit_prefill=True)
    assert buckets == [
        Bucket(DECODE, 1, 1),
        Bucket(DECODE, 2, 2),
        Bucket(PREFILL, 4, 2),
        Bucket(PREFILL, 16, 2),
    ]
    assert make_buckets((8,), (4,), 128, True)[-1] == Bucket(PREFILL, 4, 4)  # never more prompts than tokens
    with pytest.raises(OptionsError, match="prefill bucket 256"):
        make_buckets((1,), (16, 256), max_seq_len=128, explicit_prefill=True)
    # Default sizes above max_seq_len are dropped; none left means one bucket of max_seq_len.
    assert [b.num_tokens for b in make_buckets((1,), (32, 256), 128, False) if b.phase == PREFILL] == [32]
    assert [b.num_tokens for b in make_buckets((1,), (256,), 128, False) if b.phase == PREFILL] == [128]


# -- the scheduler's batching ----------------------------------------------------------------------------------


def test_scheduler_prefills_within_the_largest_prefill_bucket(small_artifact, llama, monkeypatch):
    """Steps stay within the largest prefill bucket (16 tokens, 2 sequences); a longer prompt is prefilled in
    chunks; every prompt token is computed once (no recompute: the pool is large enough); a decode step is one
    token each, and decode tokens of running sequences ride along with prefill chunks of others."""
    _, hf_model = llama
    prompts = mixed_prompts(hf_model.config.vocab_size, lengths=(4, 5, 6, 30, 2, 3), seed=15)
    model = xllm_compiler.load(small_artifact)
    steps: list[tuple[str, list[tuple[int, int, int]]]] = []  # phase, (prompt_len, num_computed, count) per entry
    original = model.engine.step

    def recording_step(phase, work):
        steps.append((phase, [(seq.prompt_len, seq.num_computed, n) for seq, n in work]))
        return original(phase, work)

    monkeypatch.setattr(model.engine, "step", recording_step)
    ours = model.generate(prompts, max_new_tokens=4, ignore_eos=True)
    assert ours == [hf_greedy(hf_model, p, 4) for p in prompts]

    prefilled: dict[int, int] = {}
    chunks: dict[int, int] = {}
    for phase, entries in steps:
        assert len(entries) <= 2 and sum(n for *_, n in entries) <= LARGEST_PREFILL
        if phase == DECODE:
            assert all(n == 1 and computed > 0 for _, computed, n in entries)
        for prompt_len, computed, n in entries:
            if computed < prompt_len:
                assert computed + n <= prompt_len  # a chunk never runs past its prompt
                prefilled[prompt_len] = prefilled.get(prompt_len, 0) + n
                chunks[prompt_len] = chunks.get(prompt_len, 0) + 1
    assert prefilled == {len(p): len(p) for p in prompts}  # (the lengths are distinct)
    assert chunks[30] >= 2
    # Some step mixed a decode token (computed >= prompt_len) with a prefill chunk.
    assert any(len({computed >= prompt_len for prompt_len, computed, _ in entries}) == 2 for _, entries in steps)
