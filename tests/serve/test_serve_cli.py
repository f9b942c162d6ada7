"""xllm-serve as a command: it says where it serves, answers, stops on SIGTERM; bad input is one line, exit 2."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from xllm_compiler.serve.cli import _bind, main


def test_python_dash_m_serves_until_terminated(chat_artifact):
    argv = [sys.executable, "-m", "xllm_compiler.serve", str(chat_artifact), "--port", "0", "--served-model-name", "t"]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        found = re.fullmatch(r"xllm-serve: serving t on (http://127\.0\.0\.1:\d+)\n", line)
        assert found, line
        url = found.group(1)
        for _ in range(100):  # the socket is bound; the app may still be starting
            try:
                health = httpx.get(url + "/health", timeout=10)
                break
            except httpx.TransportError:
                continue
        assert health.status_code == 200
        out = httpx.post(url + "/v1/completions", json={"model": "t", "prompt": [1, 2], "max_tokens": 2}, timeout=60)
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] >= 1
    finally:
        process.terminate()
        process.wait(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal so that the exit status says what stopped it
    assert process.returncode in (0, -signal.SIGTERM), process.stderr.read()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "x"], "--port: invalid int value"),
        (["--port", "70000"], "--port must be in [0, 65535]"),
        (["--max-queue", "-1"], "--max-queue must not be negative"),
        (["--max-num-seqs", "0"], "max_num_seqs must be a positive integer"),
        (["--speculative", "medusa"], "--speculative medusa: not 'ngram'"),
        (["--speculative", "ngram", "--num-speculative-tokens", "0"], "num_speculative_tokens"),
    ],
)
def test_bad_options_are_one_line_exit_2(chat_artifact, capsys, argv, message):
    try:
        code = main([str(chat_artifact), *argv])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_a_missing_artifact_is_one_line_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "does not exist" in err


def test_a_port_in_use_is_one_line_exit_2(chat_artifact, capsys):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main([str(chat_artifact), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"cannot listen on 127.0.0.1:{port}" in err, err


def test_accepted_connections_send_without_delay():
    """Nagle's algorithm on a kept-alive connection held each response's body for the client's delayed ACK
    (40 ms a request): the listening socket sets TCP_NODELAY, which the connections it accepts inherit."""
    listener = _bind("127.0.0.1", 0)
    with listener, socket.create_connection(listener.getsockname()):
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
