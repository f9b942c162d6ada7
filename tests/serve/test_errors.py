"""Every refusal is OpenAI-shaped with its status, names the field at fault, and leaves other requests alone."""

from __future__ import annotations

import openai
import pytest
from fastapi.testclient import TestClient

import xllm_compiler
from xllm_compiler.serve.app import ServeOptions, build_app

GOOD = {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}


def assert_error(response, status: int, param: str | None, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert all(w in error["message"] for w in words), error
    return error


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"max_tokens": 4}, "prompt", ["prompt", "required"]),
        ({**GOOD, "prompt": 5}, "prompt", ["prompt", "string", "token ids"]),
        ({**GOOD, "prompt": []}, "prompt", ["prompt"]),
        ({**GOOD, "temperature": -0.5}, "temperature", ["temperature", "greater than or equal to 0"]),
        ({**GOOD, "temperature": "hot"}, "temperature", ["temperature", "number"]),
        ({**GOOD, "max_tokens": 0}, "max_tokens", ["max_tokens", "greater than or equal to 1"]),
        ({**GOOD, "max_tokens": "4"}, "max_tokens", ["max_tokens", "integer"]),
        ({**GOOD, "top_p": 0}, "top_p", ["top_p"]),
        ({**GOOD, "stream": "yes"}, "stream", ["stream"]),
        ({**GOOD, "prompt": [1, 512]}, "prompt", ["token id 512", "outside [0, 512)"]),
        ({**GOOD, "prompt": [1, -1]}, "prompt", ["token id -1"]),
        ({**GOOD, "max_tokens": 300}, "prompt", ["exceed max_seq_len 256"]),
        ({**GOOD, "prompt": [[1, 2], [1, 9999]]}, "prompt", ["prompt 1", "9999"]),
        ({**GOOD, "echo": True}, "echo", ["echo is not supported"]),
        ({**GOOD, "n": 2}, "n", ["n is not supported"]),
        ({**GOOD, "stop": 3}, "stop", ["stop"]),
        ({**GOOD, "seed": 2**64}, "seed", ["seed"]),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_completion_fields_are_400_naming_the_field(server, body, param, words):
    error = assert_error(server.post("/v1/completions", body), 400, param, *words)
    assert error["type"] == "invalid_request_error"


def test_malformed_json_is_400(server):
    response = server.post("/v1/completions", content=b'{"prompt": [1, 2', headers={"content-type": "application/json"})
    assert_error(response, 400, None, "not valid JSON")
    assert_error(server.post("/v1/completions", [1, 2]), 400, None, "JSON object")


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"max_tokens": 4}, "messages", ["messages", "required"]),
        ({"messages": []}, "messages", ["messages"]),
        ({"messages": [{"content": "hi"}]}, "messages", ["messages.0.role", "required"]),
        ({"messages": [{"role": "user", "content": 7}]}, "messages", ["messages.0.content"]),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "messages", ["first"]),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 300}, "messages", ["max_seq_len"]),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_chat_requests_are_400(server, body, param, words):
    assert_error(server.post("/v1/chat/completions", body), 400, param, *words)


def test_an_unknown_model_is_404(server):
    error = assert_error(server.post("/v1/completions", {**GOOD, "model": "gpt-4"}), 404, "model", "gpt-4")
    assert error["code"] == "model_not_found"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)


def test_an_unknown_route_is_openai_shaped(server):
    assert_error(server.get("/v1/nothing"), 404, None)


def test_errors_leave_other_requests_alone(server, offline):
    for body in ({**GOOD, "temperature": -1}, {**GOOD, "prompt": [1, 99999]}, {**GOOD, "max_tokens": 999}):
        assert server.post("/v1/completions", body).status_code == 400
    out = server.post("/v1/completions", {**GOOD, "return_token_ids": True}).json()
    assert out["choices"][0]["token_ids"] == offline.generate([[1, 2, 3]], max_new_tokens=4)[0]
    assert server.metric("xllm_requests_waiting") == 0 and server.metric("xllm_requests_running") == 0


def test_the_api_key_guards_v1_but_not_health(make_server, chat_artifact):
    guarded = make_server(chat_artifact, ServeOptions("tiny-llama", api_key="s3cret"))
    assert guarded.get("/health").status_code == 200
    assert_error(guarded.post("/v1/completions", GOOD), 401, None, "API key")
    wrong = {"Authorization": "Bearer nope"}
    assert_error(guarded.post("/v1/completions", GOOD, headers=wrong), 401, None, "API key")
    assert guarded.get("/v1/models", headers=wrong).status_code == 401
    right = {"Authorization": "Bearer s3cret"}
    assert guarded.post("/v1/completions", GOOD, headers=right).status_code == 200
    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key="s3cret", max_retries=0)
    assert client.completions.create(model="tiny-llama", prompt=[1, 2], max_tokens=2).choices


def test_a_full_queue_is_429_with_retry_after(make_server, chat_artifact):
    full = make_server(chat_artifact, ServeOptions("tiny-llama", max_queue=0))
    response = full.post("/v1/completions", GOOD)
    error = assert_error(response, 429, None, "queue is full")
    assert error["code"] == "queue_full" and response.headers["retry-after"] == "1"


def test_an_artifact_without_tokenizer_takes_token_ids_only(make_server, bare_artifact):
    bare = make_server(bare_artifact)
    assert_error(bare.post("/v1/completions", {**GOOD, "prompt": "hello"}), 400, "prompt", "no tokenizer.json")
    assert_error(bare.post("/v1/completions", {**GOOD, "stop": "x"}), 400, "stop", "tokenizer")
    out = bare.post("/v1/completions", GOOD).json()["choices"][0]
    assert out["text"] == "" and len(out["token_ids"]) == 4
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert_error(bare.post("/v1/chat/completions", chat), 400, "messages", "no chat template")


def test_a_request_larger_than_the_kv_pool_is_400(make_server, chat_artifact):
    small = make_server(chat_artifact, kv_blocks=4)  # 4 blocks of 16 tokens: 64 tokens at most
    assert_error(small.post("/v1/completions", {**GOOD, "max_tokens": 100}), 400, "prompt", "KV blocks")
    assert small.post("/v1/completions", GOOD).status_code == 200


def test_health_is_503_unless_the_engine_runs(chat_artifact):
    model = xllm_compiler.load(chat_artifact)
    app = build_app(model, model.make_scheduler(), ServeOptions("tiny-llama"))
    assert TestClient(app).get("/health").status_code == 503  # no lifespan: the engine thread never started
    with TestClient(app) as running:
        assert running.get("/health").status_code == 200
        assert running.post("/v1/completions", json=GOOD).status_code == 200
    stopped = TestClient(app)
    assert stopped.get("/health").status_code == 503
    assert_error(stopped.post("/v1/completions", json=GOOD), 503, None, "engine is not running")
