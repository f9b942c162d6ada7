"""Under torchrun a --tp 2 artifact is served by rank 0 while rank 1 follows its steps; outputs equal --tp 1's."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading

import httpx
import psutil
import pytest

import xllm_compiler
from tests.serve.conftest import TINY_LLAMA

REPO = TINY_LLAMA.parents[1]

pytestmark = pytest.mark.distributed

#: A hang detector, not a speed bound.
TIMEOUT_S = 240


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(process: subprocess.Popen) -> None:
    tree = psutil.Process(process.pid)
    for proc in [*tree.children(recursive=True), tree]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def test_torchrun_serves_a_tp2_artifact(tmp_path, offline):
    artifact = tmp_path / "tp2"
    xllm_compiler.compile(TINY_LLAMA, artifact, tp=2, decode_buckets=[1, 4], prefill_buckets=[64], max_seq_len=128)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    command += ["--master-port", str(free_port()), "-m", "xllm_compiler.serve", str(artifact), "--port", "0"]
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environ["OMP_NUM_THREADS"] = "1"
    process = subprocess.Popen(command, env=environ, stderr=subprocess.PIPE, text=True, start_new_session=True)
    printed: list[str] = []
    serving = threading.Event()

    def drain() -> None:
        for line in process.stderr:
            printed.append(line)
            if "serving" in line:
                serving.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        assert serving.wait(TIMEOUT_S), "".join(printed)
        url = re.search(r"on (http://\S+)", next(line for line in printed if "serving" in line)).group(1)
        prompts = [[1, 40, 41, 42], [1, 7], [1, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25]]
        with httpx.Client(timeout=TIMEOUT_S) as client:
            while client.get(url + "/health").status_code != 200:
                pass
            body = {"prompt": prompts, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
            choices = client.post(url + "/v1/completions", json=body).json()["choices"]
            stream = {"prompt": prompts[0], "max_tokens": 8, "temperature": 0, "stream": True}
            streamed = client.post(url + "/v1/completions", json=stream).text
        expected = offline.generate(prompts, max_new_tokens=8)
        assert [c["token_ids"] for c in choices] == expected
        assert streamed.rstrip().endswith("data: [DONE]")
        process.send_signal(signal.SIGTERM)  # torchrun passes it on; rank 0 shuts down and tells rank 1 to stop
        process.wait(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            kill_tree(process)
            process.wait()
    ours = [line for line in printed if 'File "' in line and str(REPO) in line]
    assert ours == [], "".join(printed)  # no traceback through this project's code (torchrun prints its own)
    assert any("Finished server process" in line for line in printed), "".join(printed)
