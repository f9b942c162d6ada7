"""Fixtures of the server tests: the bundled tiny Llama compiled with a chat template, and real servers over it.

Each server is uvicorn in a background thread of this process, on a 127.0.0.1 socket bound to a free port, with
a model of its own (the scheduler is not shared); ``offline`` is another load of the same artifact, the oracle
that server outputs must equal. Servers stop at teardown.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

import xllm_compiler
from xllm_compiler.serve.app import ServeOptions, build_app
from xllm_compiler.serve.cli import _bind

TINY_LLAMA = Path(__file__).resolve().parents[2] / "tools" / "tiny-llama"
#: Decode up to 8 sequences per step; prefill buckets of 16 and 64 tokens; KV blocks of 16 tokens.
BUCKETS = dict(decode_buckets=[1, 2, 4, 8], prefill_buckets=[16, 64], max_seq_len=256)
MODEL_NAME = "tiny-llama"
#: A small template in Hugging Face's style: bos, one line per message, the assistant's turn opened at the end.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' and not loop.first %}{{ raise_exception('the system message must come first') }}"
    "{% endif %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def render(messages: list[dict[str, str]]) -> str:
    """CHAT_TEMPLATE rendered by hand (the oracle of the server's rendering)."""
    return "<s>" + "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"


@pytest.fixture(scope="session")
def chat_artifact(tmp_path_factory) -> Path:
    model_dir = tmp_path_factory.mktemp("serve") / "tiny-llama-chat"
    shutil.copytree(TINY_LLAMA, model_dir)
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": CHAT_TEMPLATE}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    out = model_dir.parent / "artifact"
    xllm_compiler.compile(model_dir, out, **BUCKETS)
    return out


@pytest.fixture(scope="session")
def bare_artifact(tmp_path_factory) -> Path:
    """The same model with neither tokenizer nor chat template (token ids only)."""
    model_dir = tmp_path_factory.mktemp("serve") / "tiny-llama-bare"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(TINY_LLAMA / name, model_dir / name)
    out = model_dir.parent / "artifact"
    xllm_compiler.compile(model_dir, out, decode_buckets=[1], prefill_buckets=[16], max_seq_len=64)
    return out


@pytest.fixture(scope="session")
def offline(chat_artifact):
    """The oracle: ``generate()`` on another load of the served artifact."""
    return xllm_compiler.load(chat_artifact)


@dataclass
class Server:
    url: str
    thread: threading.Thread
    server: uvicorn.Server
    name: str = MODEL_NAME

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, body=None, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=60, **kwargs)

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of /metrics, e.g. ``metric("xllm_kv_blocks_used")``."""
        text = self.get("/metrics").text
        found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def wait_for(self, condition, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)


def start_server(artifact: Path, options: ServeOptions | None = None, **scheduler) -> Server:
    options = options or ServeOptions(MODEL_NAME)
    model = xllm_compiler.load(artifact, kv_blocks=scheduler.pop("kv_blocks", None))
    app = build_app(model, model.make_scheduler(**scheduler), options)
    sock = _bind("127.0.0.1", 0)  # as xllm-serve binds: TCP_NODELAY on what it accepts
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    running = Server(f"http://127.0.0.1:{port}", thread, server, options.served_model_name)
    running.wait_for(lambda: server.started, "the server to start")
    return running


def stop_server(running: Server) -> None:
    running.server.should_exit = True
    running.thread.join(timeout=30)


@pytest.fixture
def make_server() -> Iterator:
    """Start servers with options of the test's choosing; all stopped at teardown."""
    started: list[Server] = []

    def make(artifact: Path, options: ServeOptions | None = None, **scheduler) -> Server:
        started.append(start_server(artifact, options, **scheduler))
        return started[-1]

    yield make
    for running in started:
        stop_server(running)


@pytest.fixture(scope="module")
def server(chat_artifact) -> Iterator[Server]:
    """A server with default options over the chat artifact, shared by a test module."""
    running = start_server(chat_artifact)
    yield running
    stop_server(running)
