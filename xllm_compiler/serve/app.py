"""The FastAPI app: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health and /metrics.

Handlers check a request completely (fields, model name, prompt against vocabulary and max_seq_len, queue room)
before it reaches the engine, so a bad request is a 4xx that leaves every other request untouched. Streaming
responses are server-sent events ending in ``data: [DONE]``, chunked as OpenAI chunks them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from xllm_compiler.errors import InputError
from xllm_compiler.runtime.requests import Request as EngineRequest
from xllm_compiler.runtime.requests import SamplingParams
from xllm_compiler.serve.chat import ChatRenderer, ChatTemplateError, artifact_renderer
from xllm_compiler.serve.engine_loop import EngineLoop
from xllm_compiler.serve.generation import Choice, Generation
from xllm_compiler.serve.http_errors import OpenAIError, bad_request, install_error_handlers
from xllm_compiler.serve.metrics import ServerMetrics
from xllm_compiler.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from xllm_compiler.serve.ranks import RankChannel

#: How often a non-streaming handler checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class ServeOptions:
    """What the server adds to the model and its scheduler."""

    served_model_name: str
    """The name /v1/models lists and requests' ``model`` must match."""
    max_queue: int | None = None
    """Requests allowed to wait for admission; more get a 429 with Retry-After. None: no limit."""
    api_key: str | None = None
    """When set, /v1 routes need ``Authorization: Bearer <key>`` (/health and /metrics stay open)."""


@dataclass
class ServerState:
    """What the handlers share: the model (read-only here), its engine thread, the chat renderer, metrics."""

    model: Any
    engine: EngineLoop
    options: ServeOptions
    metrics: ServerMetrics
    tokenizer: Any | None
    chat: ChatRenderer | None
    created: int


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class Handlers:
    """The request checks and response shapes of both generation endpoints."""

    def __init__(self, state: ServerState):
        self.state = state

    # -- checks ---------------------------------------------------------------------------------------------

    def check(self, body: SamplingFields, choices: int) -> None:
        name = self.state.options.served_model_name
        if body.model is not None and body.model != name:
            message = f"the model '{body.model}' does not exist: this server serves '{name}'"
            raise OpenAIError(404, message, param="model", code="model_not_found")
        if field := body.unsupported():
            raise bad_request(f"{field} is not supported by this server (leave it at its default)", param=field)
        if body.stop and self.state.tokenizer is None:
            raise bad_request("stop strings need a tokenizer, and this artifact has none", param="stop")
        if not self.state.engine.ready:
            raise OpenAIError(503, "the engine is not running", kind="server_error")
        limit = self.state.options.max_queue
        if limit is not None and self.state.engine.queued() + choices > limit:
            message = f"the server's queue is full ({limit} requests waiting): retry later"
            raise OpenAIError(429, message, kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    def encode(self, text: str, param: str, special_tokens: bool = True) -> list[int]:
        if self.state.tokenizer is None:
            raise bad_request("this artifact has no tokenizer.json: send the prompt as token ids", param=param)
        return self.state.tokenizer.encode(text, add_special_tokens=special_tokens).ids

    def checked(self, ids: list[int], max_tokens: int, param: str, index: int | None = None) -> list[int]:
        try:
            return self.state.model.check_prompt(ids, max_tokens, index=index)
        except InputError as exc:
            raise bad_request(str(exc), param=param) from None

    def generation(
        self, body: SamplingFields, prefix: str, prompts: list[list[int]], max_tokens: list[int]
    ) -> Generation:
        call = f"{prefix}-{uuid.uuid4().hex}"
        requests = [
            EngineRequest(
                f"{call}-{i}",
                prompt,
                SamplingParams(
                    max_new_tokens=n,
                    temperature=body.temperature,
                    top_p=body.top_p,
                    seed=body.seed,
                    ignore_eos=body.ignore_eos,
                ),
            )
            for i, (prompt, n) in enumerate(zip(prompts, max_tokens, strict=True))
        ]
        return Generation(
            call, self.state.engine, requests, self.state.tokenizer, body.stop_strings(), self.state.metrics
        )

    async def started(self, generation: Generation, param: str) -> None:
        try:
            await generation.start()
        except InputError as exc:  # e.g. more KV blocks than the pool has
            raise bad_request(str(exc), param=param) from None

    # -- responses ------------------------------------------------------------------------------------------

    def head(self, generation: Generation, kind: str) -> dict[str, Any]:
        """The fields every response and chunk of one call shares (a stream computes it once)."""
        return {
            "id": generation.call_id,
            "object": kind,
            "created": int(time.time()),
            "model": self.state.options.served_model_name,
        }

    async def finished(self, generation: Generation, request: Request) -> bool:
        """Wait for every choice; False if the client went away first (its requests are then aborted)."""
        task = asyncio.ensure_future(generation.collect())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
                if done:
                    task.result()
                    return True
                if await request.is_disconnected():
                    return False
        finally:
            task.cancel()

    def extras(self, body: SamplingFields, tokens: list[int]) -> dict[str, Any]:
        return {"token_ids": tokens} if body.return_token_ids or self.state.tokenizer is None else {}

    async def completion_stream(self, body: CompletionRequest, generation: Generation) -> AsyncIterator[str]:
        usage = body.stream_options is not None and body.stream_options.include_usage
        head = self.head(generation, "text_completion")
        async for delta in generation.deltas():
            choice = {"index": delta.index, "text": delta.text, "logprobs": None, "finish_reason": delta.finish_reason}
            choice.update(self.extras(body, delta.token_ids))
            yield _sse({**head, "choices": [choice], **({"usage": None} if usage else {})})
        if usage:
            yield _sse({**head, "choices": [], "usage": generation.usage()})
        yield _sse("[DONE]")

    async def chat_stream(self, body: ChatCompletionRequest, generation: Generation) -> AsyncIterator[str]:
        usage = body.stream_options is not None and body.stream_options.include_usage
        head = self.head(generation, "chat.completion.chunk")
        tail = {"usage": None} if usage else {}

        def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> str:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return _sse({**head, "choices": [choice], **tail})

        for choice in generation.choices:
            yield chunk(choice.index, {"role": "assistant", "content": ""})
        async for delta in generation.deltas():
            if delta.text or (body.return_token_ids and delta.token_ids):
                yield chunk(delta.index, {"content": delta.text, **self.extras(body, delta.token_ids)})
            if delta.finish_reason is not None:
                yield chunk(delta.index, {}, delta.finish_reason)
        if usage:
            yield _sse({**head, "choices": [], "usage": generation.usage()})
        yield _sse("[DONE]")

    # -- endpoints ------------------------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        prompts = body.prompts()
        self.check(body, len(prompts))
        index = (lambda i: i) if len(prompts) > 1 else (lambda i: None)
        ids = [
            self.checked(p if isinstance(p, list) else self.encode(p, "prompt"), body.max_tokens, "prompt", index(i))
            for i, p in enumerate(prompts)
        ]
        generation = self.generation(body, "cmpl", ids, [body.max_tokens] * len(ids))

        def choice(c: Choice) -> dict[str, Any]:
            return {"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}

        stream = partial(self.completion_stream, body, generation)
        return await self.respond(body, generation, request, "prompt", stream, "text_completion", choice)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check(body, 1)
        if self.state.chat is None:
            raise bad_request(
                "this artifact has no chat template (its checkpoint's tokenizer_config.json had no chat_template): "
                "use /v1/completions",
                param="messages",
            )
        try:
            text = self.state.chat.render([m.for_template() for m in body.messages])
        except (ChatTemplateError, ValueError) as exc:
            raise bad_request(str(exc), param="messages") from None
        prompt = self.encode(text, "messages", special_tokens=False)  # the template wrote any bos itself
        cap = body.max_completion_tokens or body.max_tokens
        max_tokens = cap if cap is not None else max(1, self.state.model.max_seq_len - len(prompt))
        ids = self.checked(prompt, max_tokens, "messages")
        generation = self.generation(body, "chatcmpl", [ids], [max_tokens])

        def choice(c: Choice) -> dict[str, Any]:
            message = {"role": "assistant", "content": c.text}
            return {"index": c.index, "message": message, "logprobs": None, "finish_reason": c.finish_reason}

        stream = partial(self.chat_stream, body, generation)
        return await self.respond(body, generation, request, "messages", stream, "chat.completion", choice)

    async def respond(
        self,
        body: SamplingFields,
        generation: Generation,
        request: Request,
        param: str,
        stream: Callable[[], AsyncIterator[str]],
        kind: str,
        choice: Callable[[Choice], dict[str, Any]],
    ) -> Response:
        """Start ``generation``; stream it, or wait for it and answer with each choice as ``choice`` shapes it."""
        await self.started(generation, param)
        if body.stream:
            return StreamingResponse(stream(), media_type="text/event-stream")
        if not await self.finished(generation, request):
            return Response(status_code=499)
        choices = [choice(c) | self.extras(body, c.tokens) for c in generation.choices]
        return JSONResponse({**self.head(generation, kind), "choices": choices, "usage": generation.usage()})


def build_app(model: Any, scheduler: Any, options: ServeOptions) -> FastAPI:
    """The app over ``model`` (a CompiledModel) and its ``scheduler``; the engine thread runs while the app's
    lifespan does. ArtifactError for a chat template that does not parse."""
    metrics = ServerMetrics(lambda: engine.snapshot)
    ranks = RankChannel() if model.engine.group.size > 1 else None  # under torchrun: the others follow (ranks.py)
    engine = EngineLoop(model, scheduler, metrics, ranks)
    tokenizer = model.tokenizer if model.manifest.tokenizer else None
    state = ServerState(model, engine, options, metrics, tokenizer, artifact_renderer(model), int(time.time()))
    handlers = Handlers(state)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="xllm-serve", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)

    def authorized(request: Request) -> None:
        key = options.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise OpenAIError(
                401, "a missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key"
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])
    v1.add_api_route("/completions", handlers.completions, methods=["POST"])
    v1.add_api_route("/chat/completions", handlers.chat_completions, methods=["POST"])

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": options.served_model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "xllm_compiler",
            "max_model_len": model.max_seq_len,
        }
        return {"object": "list", "data": [card]}

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
