"""/v1/completions and /v1/chat/completions through the openai client: greedy outputs equal offline generate()."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.serve.conftest import render

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0)


def greedy(offline, ids: list[int], n: int) -> list[int]:
    return offline.generate([ids], max_new_tokens=n)[0]


def test_text_prompt_equals_offline_generate(server, client, offline):
    out = client.completions.create(
        model=server.name, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"return_token_ids": True}
    )
    expected = greedy(offline, offline.encode(PROMPT), 12)
    (choice,) = out.choices
    assert choice.model_extra["token_ids"] == expected
    assert choice.text == offline.decode(expected) and choice.text
    assert choice.finish_reason == "length" and choice.index == 0
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == server.name
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(offline.encode(PROMPT)), 12)
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_token_id_prompt_streams_the_offline_text(server, client, offline):
    ids = [1, 40, 41, 42, 7]
    stream = client.completions.create(
        model=server.name,
        prompt=ids,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    *text_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == offline.decode(greedy(offline, ids, 10))
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 10
    assert len({c.id for c in chunks}) == 1


def test_a_list_of_prompts_gives_one_choice_each_in_order(server, client, offline):
    prompts = [PROMPT, [1, 9, 10, 11], "Once upon a time"]
    out = client.completions.create(model=server.name, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for choice, prompt in zip(out.choices, prompts, strict=True):
        ids = prompt if isinstance(prompt, list) else offline.encode(prompt)
        assert choice.text == offline.decode(greedy(offline, ids, 6))


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_ends_the_text_before_it(server, client, offline, stream):
    full = offline.decode(greedy(offline, offline.encode(PROMPT), 24))
    stop = full[6:9]  # occurs first somewhere at or before offset 6
    out = client.completions.create(
        model=server.name, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "zzzz"], stream=stream
    )
    chunks = list(out) if stream else [out]
    text = "".join(c.choices[0].text for c in chunks)
    assert text == full[: full.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_seeded_sampled_request_is_reproducible(server, client, offline):
    kwargs = dict(model=server.name, prompt=[1, 2, 3], max_tokens=8, temperature=1.0, seed=7, extra_body={})
    kwargs["extra_body"] = {"return_token_ids": True, "ignore_eos": True}
    first, second = (client.completions.create(**kwargs).choices[0] for _ in range(2))
    expected = offline.generate([[1, 2, 3]], max_new_tokens=8, temperature=1.0, seed=7, ignore_eos=True)[0]
    assert first.model_extra["token_ids"] == second.model_extra["token_ids"] == expected


MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a fox."}]


def test_chat_renders_the_checkpoint_template(server, client, offline):
    out = client.chat.completions.create(model=server.name, messages=MESSAGES, max_tokens=10, temperature=0)
    ids = offline.tokenizer.encode(render(MESSAGES), add_special_tokens=False).ids
    (choice,) = out.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == offline.decode(greedy(offline, ids, 10))
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.usage.prompt_tokens == len(ids)


def test_chat_streams_deltas_as_openai_does(server, client, offline):
    stream = client.chat.completions.create(
        model=server.name,
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    first, *middle, last, usage = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert last.choices[0].finish_reason == "length" and last.choices[0].delta.content is None
    ids = offline.tokenizer.encode(render(MESSAGES), add_special_tokens=False).ids
    assert "".join(c.choices[0].delta.content for c in middle) == offline.decode(greedy(offline, ids, 10))
    assert usage.choices == [] and usage.usage.completion_tokens == 10


def test_raw_sse_ends_with_done(server):
    body = {"prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_models_and_health(server):
    assert server.get("/health").status_code == 200
    models = server.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [server.name]


def test_32_concurrent_streams_equal_their_offline_outputs(server, offline):
    lengths = [(1 + (7 * i) % 40, 1 + (5 * i) % 20) for i in range(32)]  # (prompt tokens, max_tokens)
    prompts = [[(3 + 11 * i + j) % 500 + 3 for j in range(n)] for i, (n, _) in enumerate(lengths)]
    expected = [offline.decode(greedy(offline, p, m)) for p, (_, m) in zip(prompts, lengths, strict=True)]

    async def one(client: openai.AsyncOpenAI, prompt: list[int], max_tokens: int) -> str:
        stream = await client.completions.create(
            model=server.name, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
        )
        return "".join([c.choices[0].text async for c in stream])

    async def all_of_them() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0
        ) as client:
            return await asyncio.gather(*(one(client, p, m) for p, (_, m) in zip(prompts, lengths, strict=True)))

    assert asyncio.run(all_of_them()) == expected
    assert server.metric("xllm_requests_running") == 0


def test_a_speculative_server_gives_the_offline_greedy_tokens(make_server, chat_artifact, offline):
    """--speculative ngram: verify steps behind the same API, the same greedy tokens."""
    speculating = make_server(chat_artifact, speculator=offline.speculator("ngram", 3))
    prompts = [[1, 40, 41, 42, 40, 41, 42, 40], [1, 9, 10, 11]]
    for ids in prompts:
        body = {"model": speculating.name, "prompt": ids, "max_tokens": 12, "temperature": 0}
        out = speculating.post("/v1/completions", {**body, "return_token_ids": True}).json()
        assert out["choices"][0]["token_ids"] == greedy(offline, ids, 12)
