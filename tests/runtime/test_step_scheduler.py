"""The step-level scheduler: requests join between steps, long prompts are prefilled in chunks, a short pool
preempts and recomputes, aborts free blocks at once, sampling is per request; greedy answers never change."""

from __future__ import annotations

import pytest
import torch

import xllm_compiler
from tests.hf_oracle import mixed_prompts
from tests.runtime.conftest import SMALL_BUCKETS
from xllm_compiler.errors import KVCacheExhaustedError, OptionsError, RequestError
from xllm_compiler.interface import RESERVED_BLOCKS
from xllm_compiler.runtime.requests import ABORT, LENGTH, STOP, Request, RequestOutput, SamplingParams

GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)
STATS_KEYS = {
    "running",
    "waiting",
    "finished",
    "prompt_tokens",
    "generation_tokens",
    "preemptions",
    "prefix_cache_queries",
    "prefix_cache_hits",
    "kv_blocks_used",
    "kv_blocks_total",
    "cached_blocks",
}


@pytest.fixture(scope="module")
def artifact(checkpoints, llama):
    """Blocks of 4 tokens: sequences span many blocks, so growth, sharing and preemption all happen."""
    model_dir, _ = llama
    return checkpoints.artifact(model_dir, **{**SMALL_BUCKETS, "block_size": 4})


@pytest.fixture(scope="module")
def model(artifact):
    return xllm_compiler.load(artifact)


@pytest.fixture(scope="module")
def prompts(llama):
    _, hf_model = llama
    return mixed_prompts(hf_model.config.vocab_size, lengths=(9, 14, 3, 20, 6), seed=41)


@pytest.fixture(scope="module")
def expected(model, prompts):
    """Each prompt's greedy tokens, run alone."""
    return [model.generate([p], max_new_tokens=GREEDY.max_new_tokens, ignore_eos=True)[0] for p in prompts]


def tokens_of(outputs: list[RequestOutput]) -> list[int]:
    return [t for out in outputs for t in out.new_tokens]


def drain(scheduler, outputs: dict[str, list[RequestOutput]] | None = None) -> dict[str, list[RequestOutput]]:
    outputs = {} if outputs is None else outputs
    with torch.inference_mode():
        while scheduler.has_work():
            for out in scheduler.step():
                outputs.setdefault(out.request_id, []).append(out)
    return outputs


def assert_pool_back(model) -> None:
    memory = model.memory_stats()
    assert memory["kv_blocks_used"] == 0 and memory["kv_blocks_free"] == memory["kv_blocks_total"]


def test_requests_joining_between_steps_answer_as_alone(model, prompts, expected):
    scheduler = model.make_scheduler()
    scheduler.add(Request("a", prompts[3], GREEDY))
    outputs = {}
    with torch.inference_mode():
        for _ in range(3):
            for out in scheduler.step():
                outputs.setdefault(out.request_id, []).append(out)
    scheduler.add(Request("b", prompts[0], GREEDY))
    scheduler.add(Request("c", prompts[2], GREEDY))
    drain(scheduler, outputs)
    assert [tokens_of(outputs[k]) for k in "abc"] == [expected[3], expected[0], expected[2]]
    for run in outputs.values():
        assert [out.finished for out in run] == [False] * (len(run) - 1) + [True]
        assert run[-1].finish_reason == LENGTH
    stats = scheduler.stats()
    assert set(stats) >= STATS_KEYS
    assert (stats["running"], stats["waiting"], stats["finished"]) == (0, 0, 3)
    assert stats["generation_tokens"] == 3 * GREEDY.max_new_tokens
    assert stats["prompt_tokens"] == len(prompts[3]) + len(prompts[0]) + len(prompts[2])
    assert_pool_back(model)


@pytest.mark.parametrize("budget", [1, 3, 5])
def test_chunked_prefill_gives_the_same_tokens_and_logits(artifact, model, prompts, expected, budget):
    scheduler = xllm_compiler.load(artifact).make_scheduler(max_num_batched_tokens=budget)
    params = SamplingParams(max_new_tokens=GREEDY.max_new_tokens, ignore_eos=True, return_logits=True)
    with torch.inference_mode():
        outputs = scheduler.run(Request(str(i), p, params) for i, p in enumerate(prompts))
    assert [tokens_of(outputs[str(i)]) for i in range(len(prompts))] == expected
    for i, prompt in enumerate(prompts):
        chunks = [out for out in outputs[str(i)] if not out.new_tokens]
        assert len(chunks) >= -(-len(prompt) // budget) - 1  # the prompt went in pieces, none yielding a token
        assert all(out.logits is None for out in chunks)
        first = next(out for out in outputs[str(i)] if out.new_tokens)
        assert torch.allclose(first.logits, model.logits([prompt])[0], rtol=0, atol=1e-5)


def test_mixed_steps_stay_in_buckets(artifact, prompts):
    """Defaults: a long prompt arriving while others decode is prefilled alongside their decode tokens, on the
    prefill bucket (a prefill bucket holds as many sequences as the largest decode bucket): never the fallback."""
    model = xllm_compiler.load(artifact)
    scheduler = model.make_scheduler()
    scheduler.add(Request("short", prompts[2], GREEDY))
    with torch.inference_mode():
        scheduler.step()
    scheduler.add(Request("long", mixed_prompts(model.vocab_size, lengths=(40,), seed=42)[0], GREEDY))
    drain(scheduler)
    assert scheduler.stats()["mixed_steps"] > 0
    assert model.stats().get("fallbacks", 0) == 0


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_recomputes_and_gives_the_same_tokens(artifact, prompts, expected, prefix_caching):
    # 9 blocks of 4: enough for any one request (<= 30 tokens: 8 blocks), not for the first two together (5 + 6).
    model = xllm_compiler.load(artifact, kv_blocks=9 + RESERVED_BLOCKS)
    before = model.memory_stats()
    scheduler = model.make_scheduler(enable_prefix_caching=prefix_caching)
    with torch.inference_mode():
        outputs = scheduler.run(Request(str(i), p, GREEDY) for i, p in enumerate(prompts))
    assert [tokens_of(outputs[str(i)]) for i in range(len(prompts))] == expected
    stats = scheduler.stats()
    assert stats["preemptions"] > 0
    assert stats["computed_tokens"] > stats["prompt_tokens"] + stats["generation_tokens"] - len(prompts)
    assert stats["kv_blocks_used"] == 0
    after = model.memory_stats()
    assert after["kv_blocks_free"] == before["kv_blocks_free"] == after["kv_blocks_total"]
    assert after["kv_blocks_peak"] == 9


def test_a_full_pool_preempts_rather_than_refuses(artifact, prompts, expected):
    """generate() on a pool that holds one request at a time gives the same answers."""
    model = xllm_compiler.load(artifact, kv_blocks=8 + RESERVED_BLOCKS)
    assert model.generate(prompts, max_new_tokens=GREEDY.max_new_tokens, ignore_eos=True) == expected
    assert_pool_back(model)


def test_abort_frees_blocks_now_and_reports_abort(artifact, prompts, expected):
    model = xllm_compiler.load(artifact)
    scheduler = model.make_scheduler()
    scheduler.add(Request("keep", prompts[0], GREEDY))
    scheduler.add(Request("drop", prompts[3], GREEDY))
    scheduler.add(Request("queued", prompts[1], GREEDY))  # max_num_seqs 2: still waiting
    with torch.inference_mode():
        scheduler.step()
        scheduler.step()
    assert scheduler.stats()["waiting"] == 1
    used = model.memory_stats()["kv_blocks_used"]
    scheduler.abort("drop")
    scheduler.abort("queued")
    assert model.memory_stats()["kv_blocks_used"] < used
    scheduler.abort("drop")  # already gone: nothing happens
    scheduler.abort("never-added")
    with torch.inference_mode():
        first = scheduler.step()
    aborted = [out for out in first if out.request_id in ("drop", "queued")]
    assert sorted(aborted, key=lambda o: o.request_id) == [
        RequestOutput("drop", [], True, ABORT),
        RequestOutput("queued", [], True, ABORT),
    ]
    outputs = drain(scheduler, {"keep": [out for out in first if out.request_id == "keep"]})
    assert set(outputs) == {"keep"}
    assert len(tokens_of(outputs["keep"])) == GREEDY.max_new_tokens - 2
    assert_pool_back(model)
    scheduler.add(Request("drop", prompts[3], GREEDY))  # the id is free again
    assert tokens_of(drain(scheduler)["drop"]) == expected[3]


def test_requests_that_can_never_fit_or_repeat_an_id_are_refused(artifact, prompts):
    model = xllm_compiler.load(artifact, kv_blocks=8 + RESERVED_BLOCKS)
    scheduler = model.make_scheduler()
    with pytest.raises(KVCacheExhaustedError, match="needs 9 KV blocks; the pool has 8"):
        scheduler.add(Request("big", prompts[3], SamplingParams(max_new_tokens=16)))
    scheduler.add(Request("a", prompts[0], GREEDY))
    with pytest.raises(RequestError, match="'a' is already in use"):
        scheduler.add(Request("a", prompts[1], GREEDY))
    assert scheduler.stats()["waiting"] == 1


@pytest.mark.parametrize(
    ("option", "value"), [("max_num_seqs", 0), ("max_num_batched_tokens", -1), ("max_num_seqs", 1.5)]
)
def test_bad_limits_are_refused(model, option, value):
    with pytest.raises(OptionsError, match=option):
        model.make_scheduler(**{option: value})


def test_seeded_sampling_does_not_depend_on_batch_mates(model, prompts):
    seeded = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    alone = model.make_scheduler()
    with torch.inference_mode():
        by_itself = tokens_of(alone.run([Request("s", prompts[1], seeded)])["s"])
    batch = [
        Request("g", prompts[0], GREEDY),
        Request("other", prompts[2], SamplingParams(max_new_tokens=12, temperature=0.8, seed=3, ignore_eos=True)),
        Request("s", prompts[1], seeded),
        Request("free", prompts[4], SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True)),
    ]
    with torch.inference_mode():
        together = model.make_scheduler(max_num_batched_tokens=7).run(batch)
    assert tokens_of(together["s"]) == by_itself
    greedy = model.generate([prompts[1]], max_new_tokens=12, ignore_eos=True)[0]
    assert by_itself != greedy  # it did sample
    # generate(seed=...) seeds every prompt alike: a prompt's samples do not depend on the others in the call.
    assert model.generate([prompts[1]], 12, temperature=1.0, seed=7, ignore_eos=True)[0] == by_itself
    assert model.generate(prompts[:3], 12, temperature=1.0, seed=7, ignore_eos=True)[1] == by_itself


def test_stop_token_ids_end_a_request_with_stop(model, prompts, expected):
    stop = expected[0][3]
    cut = expected[0][: expected[0].index(stop) + 1]
    scheduler = model.make_scheduler()
    params = SamplingParams(max_new_tokens=10, ignore_eos=True, stop_token_ids=(stop,))
    with torch.inference_mode():
        outputs = scheduler.run([Request("x", prompts[0], params), Request("y", prompts[1], GREEDY)])
    assert tokens_of(outputs["x"]) == cut and outputs["x"][-1].finish_reason == STOP
    assert tokens_of(outputs["y"]) == expected[1] and outputs["y"][-1].finish_reason == LENGTH


def test_logits_only_requests(model, prompts):
    """max_new_tokens 0 with return_logits: one output, finished at the prompt's end, with its last logits."""
    scheduler = model.make_scheduler()
    with torch.inference_mode():
        outputs = scheduler.run([Request("x", prompts[3], SamplingParams(max_new_tokens=0, return_logits=True))])
    (last,) = [out for out in outputs["x"] if out.finished]
    assert last.new_tokens == [] and last.finish_reason == LENGTH
    assert torch.equal(last.logits, model.logits([prompts[3]])[0])


def test_check_prompt_names_the_problem(model):
    assert model.check_prompt(torch.tensor([1, 2]), 3) == [1, 2]
    with pytest.raises(RequestError, match=r"^prompt: token id 999 is outside \[0, 256\)$"):
        model.check_prompt([1, 999], 3)
    with pytest.raises(RequestError, match=r"^prompt 4: 120 prompt tokens \+ 10 new tokens exceed max_seq_len 128"):
        model.check_prompt([1] * 120, 10, index=4)
    with pytest.raises(RequestError, match=r"^prompt is empty$"):
        model.check_prompt([], 1)
