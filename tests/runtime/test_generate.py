"""generate(): batching does not change answers, eos stops a sequence right after it, and sampling is
reproducible for a seed."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import xllm_compiler
from tests.hf_oracle import hf_greedy, mixed_prompts
from tests.runtime.conftest import SMALL_BUCKETS
from xllm_compiler.runtime.sampling import sample

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def prompts(llama):
    _, hf_model = llama
    return mixed_prompts(hf_model.config.vocab_size, lengths=(5, 1, 23, 40, 9), seed=21)


# -- batching --------------------------------------------------------------------------------------------------


def test_mixed_lengths_decode_together_as_each_alone(small_model, llama, prompts):
    _, hf_model = llama
    together = small_model.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    alone = [small_model.generate([p], max_new_tokens=NEW_TOKENS, ignore_eos=True)[0] for p in prompts]
    assert together == alone
    assert together == [hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]


def test_prompt_order_does_not_change_outputs(small_model, prompts):
    forward = small_model.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    order = [3, 0, 4, 2, 1]
    shuffled = small_model.generate([prompts[i] for i in order], max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert shuffled == [forward[i] for i in order]


def test_repeated_calls_are_identical(small_model, llama, prompts):
    """The KV cache is reused between calls; nothing of one call may leak into the next."""
    _, hf_model = llama
    first = small_model.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    first_logits = small_model.logits(prompts)
    # Dirty the cache with other, longer requests in between.
    other = mixed_prompts(hf_model.config.vocab_size, lengths=(60, 33, 2), seed=22)
    small_model.generate(other, max_new_tokens=20, ignore_eos=True)
    assert small_model.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True) == first
    assert torch.equal(small_model.logits(prompts), first_logits)
    assert small_model.generate(prompts[::-1], max_new_tokens=NEW_TOKENS, ignore_eos=True) == first[::-1]


def test_duplicate_prompts_in_one_batch(small_model, prompts):
    alone = small_model.generate([prompts[2]], max_new_tokens=NEW_TOKENS, ignore_eos=True)[0]
    assert small_model.generate([prompts[2]] * 3, max_new_tokens=NEW_TOKENS, ignore_eos=True) == [alone] * 3


def test_max_new_tokens_zero_and_one(small_model, prompts):
    assert small_model.generate(prompts, max_new_tokens=0) == [[] for _ in prompts]
    assert small_model.generate([], max_new_tokens=4) == []
    greedy = small_model.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert small_model.generate(prompts, max_new_tokens=1, ignore_eos=True) == [g[:1] for g in greedy]


def test_tensor_prompts_are_accepted(small_model, prompts):
    expected = small_model.generate(prompts[:2], max_new_tokens=4, ignore_eos=True)
    as_tensors = [torch.tensor(p) for p in prompts[:2]]
    assert small_model.generate(as_tensors, max_new_tokens=4, ignore_eos=True) == expected


@pytest.mark.parametrize(
    ("request_kwargs", "match"),
    [
        (dict(prompts=[[]]), "empty"),
        (dict(prompts=[[1, 256]]), "outside"),
        (dict(prompts=[[1, -1]]), "outside"),
        (dict(prompts="hello"), "token-id lists"),
        (dict(prompts=[[1]], max_new_tokens=-1), "max_new_tokens"),
        (dict(prompts=[[1]], temperature=-0.5), "temperature"),
        (dict(prompts=[[1]], top_p=0.0), "top_p"),
        (dict(prompts=[[1]], top_p=1.5), "top_p"),
    ],
)
def test_bad_requests_raise_value_errors(small_model, request_kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_model.generate(**request_kwargs)


# -- eos -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eos_case(tmp_path_factory, llama, small_model):
    """An artifact whose eos is a token that greedy generation of ``prompts`` produces mid-way.

    Returns (model, prompts, eos, free-running outputs)."""
    model_dir, hf_model = llama
    prompts = mixed_prompts(hf_model.config.vocab_size, lengths=(7, 20, 3, 12), seed=23)
    free = small_model.generate(prompts, max_new_tokens=16, ignore_eos=True)
    # The token of prompt 0's output that first appears latest (but not last): generation must stop early.
    firsts = {}
    for i, token in enumerate(free[0][:-1]):
        firsts.setdefault(token, i)
    eos = max(firsts, key=lambda t: firsts[t] if firsts[t] >= 1 else -1)
    assert firsts[eos] >= 1, f"no usable eos candidate in {free[0]}"

    root = tmp_path_factory.mktemp("eos")
    ckpt = root / "ckpt"
    shutil.copytree(model_dir, ckpt)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((ckpt / name).read_text())
        config["eos_token_id"] = eos
        (ckpt / name).write_text(json.dumps(config))
    xllm_compiler.compile(ckpt, root / "artifact", **SMALL_BUCKETS)
    model = xllm_compiler.load(root / "artifact")
    assert model.eos_token_ids == (eos,)
    return model, prompts, eos, free


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_generation_stops_right_after_eos(eos_case):
    model, prompts, eos, free = eos_case
    stopped = model.generate(prompts, max_new_tokens=16)
    assert stopped[0] == until_eos(free[0], eos)
    assert len(stopped[0]) < 16 and stopped[0][-1] == eos
    # The others stop at their own first eos, or run to max_new_tokens; batching does not change that.
    assert stopped == [until_eos(f, eos) for f in free]
    assert [model.generate([p], max_new_tokens=16)[0] for p in prompts] == stopped


def test_ignore_eos_runs_to_max_new_tokens(eos_case):
    model, prompts, _, free = eos_case
    assert model.generate(prompts, max_new_tokens=16, ignore_eos=True) == free


def test_eos_in_the_prompt_does_not_stop_generation(eos_case):
    model, prompts, eos, _ = eos_case
    prompt = [*prompts[1], eos]
    free = model.generate([prompt], max_new_tokens=8, ignore_eos=True)[0]
    stopped = model.generate([prompt], max_new_tokens=8)[0]
    assert len(stopped) >= 1
    assert stopped == until_eos(free, eos)


def test_eos_as_the_first_new_token(eos_case):
    """A prompt whose greedy continuation starts with eos (prefill produces it) gives just [eos]."""
    model, prompts, eos, free = eos_case
    prompt = prompts[0] + free[0][: free[0].index(eos)]
    assert model.generate([prompt, prompts[2]], max_new_tokens=16) == [[eos], until_eos(free[2], eos)]
    assert model.generate([prompt], max_new_tokens=16, ignore_eos=True)[0][0] == eos


def test_eos_frees_the_kv_blocks(eos_case):
    model, prompts, _, _ = eos_case
    model.generate(prompts, max_new_tokens=16)
    memory = model.memory_stats()
    assert memory["kv_blocks_used"] == 0
    assert memory["kv_blocks_free"] == memory["kv_blocks_total"]


# -- sampling --------------------------------------------------------------------------------------------------


def test_same_seed_same_samples(small_model, prompts):
    first = small_model.generate(prompts, max_new_tokens=12, temperature=1.0, seed=123, ignore_eos=True)
    again = small_model.generate(prompts, max_new_tokens=12, temperature=1.0, seed=123, ignore_eos=True)
    assert first == again
    assert all(0 <= t < small_model.vocab_size for tokens in first for t in tokens)


def test_different_seeds_differ(small_model, prompts):
    runs = [
        small_model.generate(prompts[:2], max_new_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)
        for seed in range(3)
    ]
    assert runs[0] != runs[1] and runs[1] != runs[2] and runs[0] != runs[2]


def test_sampling_differs_from_greedy(small_model, prompts):
    greedy = small_model.generate(prompts, max_new_tokens=12, ignore_eos=True)
    sampled = small_model.generate(prompts, max_new_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    assert sampled != greedy


@pytest.mark.parametrize("seed", [7, None])
def test_tiny_top_p_is_greedy(small_model, prompts, seed):
    greedy = small_model.generate(prompts, max_new_tokens=12, ignore_eos=True)
    nucleus = small_model.generate(prompts, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=seed, ignore_eos=True)
    assert nucleus == greedy


def test_sample_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1]])
    logits = probs.log().repeat(400, 1)
    generator = torch.Generator().manual_seed(0)
    # top_p 0.6: {1 (0.5), 2 (0.3)} is the smallest prefix reaching it.
    assert set(sample(logits, 1.0, 0.6, generator)) == {1, 2}
    assert set(sample(logits, 1.0, 0.5, generator)) == {1}
    assert set(sample(logits, 1.0, 1.0, generator)) == {0, 1, 2, 3}
    assert sample(logits[:3], 0.0, 1.0, None) == [1, 1, 1]
