"""The engine behind the server: disconnects free blocks, long prompts prefill in chunks, prefixes are shared."""

from __future__ import annotations

import asyncio
import time

import httpx

import xllm_compiler
from tests.serve.conftest import MODEL_NAME
from xllm_compiler.runtime.requests import Request, SamplingParams
from xllm_compiler.serve.app import ServeOptions
from xllm_compiler.serve.engine_loop import EngineLoop
from xllm_compiler.serve.generation import Generation
from xllm_compiler.serve.ranks import Commands


def test_a_client_disconnect_aborts_its_request_and_frees_its_blocks(make_server, chat_artifact):
    server = make_server(chat_artifact)
    free_at_start = server.metric("xllm_kv_blocks_total") - server.metric("xllm_kv_blocks_used")
    # as long as max_seq_len allows, so that it is still running when the client goes
    body = {"prompt": [1, 5, 9, 13] * 4, "max_tokens": 240, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line).startswith("data: ")
        assert server.metric("xllm_kv_blocks_used") > 0
    # the stream is closed mid-way: the handler aborts, the next engine step frees the blocks
    server.wait_for(lambda: server.metric("xllm_kv_blocks_used") == 0, "the blocks to be freed")
    server.wait_for(lambda: server.metric("xllm_requests_finished_total", '{finish_reason="abort"}') == 1, "abort")
    assert server.metric("xllm_requests_running") == 0
    assert server.metric("xllm_kv_blocks_total") - server.metric("xllm_kv_blocks_used") == free_at_start
    assert server.metric("xllm_generation_tokens_total") < 240


def test_a_prompt_longer_than_the_step_budget_is_prefilled_in_chunks(make_server, chat_artifact, offline):
    server = make_server(chat_artifact, max_num_batched_tokens=16)
    prompt = [(7 * i) % 500 + 3 for i in range(70)]
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "return_token_ids": True}
    out = server.post("/v1/completions", body)
    assert out.status_code == 200, out.text
    assert out.json()["choices"][0]["token_ids"] == offline.generate([prompt], max_new_tokens=6)[0]
    assert server.metric("xllm_steps_total", '{kind="prefill"}') >= 5  # 70 tokens, 16 a step


def test_a_shared_prefix_hits_the_prefix_cache_with_identical_outputs(make_server, chat_artifact, offline):
    server = make_server(chat_artifact)
    system = [(5 * i) % 500 + 3 for i in range(48)]  # three full 16-token blocks
    prompts = [[*system, 10, 11, 12], [*system, 20, 21], [*system, 30]]
    outputs = []
    for prompt in prompts:
        body = {"prompt": prompt, "max_tokens": 5, "temperature": 0, "return_token_ids": True}
        outputs.append(server.post("/v1/completions", body).json()["choices"][0]["token_ids"])
    assert outputs == [offline.generate([p], max_new_tokens=5)[0] for p in prompts]
    assert server.metric("xllm_prefix_cache_hit_tokens_total") == 2 * 48


def test_without_prefix_caching_nothing_is_shared(make_server, chat_artifact):
    server = make_server(chat_artifact, ServeOptions(MODEL_NAME), enable_prefix_caching=False)
    system = [(5 * i) % 500 + 3 for i in range(48)]
    for last in (10, 20):
        server.post("/v1/completions", {"prompt": [*system, last], "max_tokens": 2, "temperature": 0})
    assert server.metric("xllm_prefix_cache_hit_tokens_total") == 0


class RecordingChannel:
    """Stands in for the torchrun broadcast: what rank 0 would tell the other ranks."""

    heartbeat_s = 0.02

    def __init__(self):
        self.sent: list[Commands] = []

    def send(self, commands: Commands) -> None:
        self.sent.append(commands)


def test_rank_0_sends_every_turn_and_heartbeats_while_idle(chat_artifact, offline):
    model = xllm_compiler.load(chat_artifact)
    channel = RecordingChannel()
    engine = EngineLoop(model, model.make_scheduler(), ranks=channel)
    engine.start()
    try:

        async def one() -> list[int]:
            request = Request("t-0", [1, 2, 3], SamplingParams(max_new_tokens=3))
            generation = Generation("t", engine, [request], tokenizer=None, stop=[])
            await generation.start()
            await generation.collect()
            return generation.choices[0].tokens

        tokens = asyncio.run(one())
        time.sleep(0.2)  # idle: empty turns keep the other ranks' collective from timing out
    finally:
        engine.stop()
    assert tokens == offline.generate([[1, 2, 3]], max_new_tokens=3)[0]
    submitted = [i for i, c in enumerate(channel.sent) if c.submissions]
    assert len(submitted) == 1 and channel.sent[submitted[0]].submissions[0][0].prompt == [1, 2, 3]
    assert sum(c == Commands([], []) for c in channel.sent[submitted[0] + 1 :]) >= 3
    assert channel.sent[-1].stop
