"""``xllm-serve OUT_DIR [options]``: serve a compiled artifact over OpenAI's HTTP API (also ``python -m
xllm_compiler.serve``).

The artifact is loaded and the port bound before the server starts, so a bad artifact, a bad option or a port
in use is one line on stderr and exit code 2 (1 for an internal error), never a traceback. Under torchrun with
a --tp/--ep artifact (``torchrun --nproc-per-node N -m xllm_compiler.serve OUT_DIR``) rank 0 serves and the
other ranks follow its steps (serve/ranks.py).
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from xllm_compiler.console import EXIT_OK, OneLineParser, guarded, version_string
from xllm_compiler.errors import OptionsError
from xllm_compiler.run import add_speculative_options, speculative_from_args

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 9977


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="xllm-serve", description="Serve a compiled artifact over OpenAI's HTTP API.")
    parser.add_argument("artifact", help="folder written by xllm-compile")
    parser.add_argument("--version", action="version", version=version_string("xllm-serve"))
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (default %(default)s)")
    parser.add_argument(
        "--served-model-name", metavar="NAME", help="the model's name in the API (default: the artifact folder's)"
    )
    parser.add_argument(
        "--max-num-seqs", type=int, metavar="N", help="sequences per step (default: the largest decode bucket)"
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        metavar="N",
        help="tokens per step; longer prompts are prefilled in chunks (default: the largest prefill bucket)",
    )
    parser.add_argument(
        "--max-queue", type=int, metavar="N", help="requests that may wait for admission; more get 429 (default: any)"
    )
    parser.add_argument(
        "--kv-blocks", type=int, metavar="N", help="KV-cache blocks in the pool (default: sized when loading)"
    )
    parser.add_argument(
        "--max-memory-utilization", type=float, metavar="F", help="size the KV pool to this share of device memory"
    )
    parser.add_argument("--no-prefix-caching", action="store_true", help="do not share KV blocks of common prefixes")
    parser.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1 routes")
    add_speculative_options(parser)
    parser.add_argument("--device", help="run on this device (default: the artifact's target)")
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="server log level (default %(default)s)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _check(args) -> None:
    if not 0 <= args.port <= 65535:
        raise OptionsError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queue is not None and args.max_queue < 0:
        raise OptionsError(f"--max-queue must not be negative, got {args.max_queue}")


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a port in use is reported before anything else runs.

    TCP_NODELAY is set on it for the connections it accepts to inherit: asyncio sets it on the sockets it
    accepts itself, not on those of a socket handed to uvicorn, and without it a response's second small
    write (the body after the headers) waits for the client's delayed ACK, 40 ms on Linux, on every request
    of a kept-alive connection after the first (measured: 44 ms time to first token on tiny-llama, 6 ms with it).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise OptionsError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _speculator(model, args, load):
    """The --speculative proposer (runtime/speculative.py), or None."""
    draft = speculative_from_args(args, load)
    return None if draft is None else model.speculator(draft, args.num_speculative_tokens)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        import uvicorn

        from xllm_compiler import load
        from xllm_compiler.serve.app import ServeOptions, build_app
        from xllm_compiler.serve.ranks import RankChannel, follow

        _check(args)
        model = load(
            args.artifact,
            device=args.device,
            kv_blocks=args.kv_blocks,
            max_memory_utilization=args.max_memory_utilization,
        )
        scheduler = model.make_scheduler(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=not args.no_prefix_caching,
            speculator=_speculator(model, args, load),
        )
        if model.engine.group.rank != 0:  # under torchrun: rank 0 serves, this rank follows its steps
            follow(scheduler, RankChannel())
            return EXIT_OK
        name = args.served_model_name or Path(args.artifact).resolve().name
        app = build_app(model, scheduler, ServeOptions(name, args.max_queue, args.api_key))
        sock = _bind(args.host, args.port)
        host, port = sock.getsockname()[:2]
        logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
        url_host = f"[{host}]" if ":" in host else host
        print(f"xllm-serve: serving {name} on http://{url_host}:{port}", file=sys.stderr, flush=True)
        config = uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level == "debug")
        uvicorn.Server(config).run(sockets=[sock])
        return EXIT_OK

    return guarded("xllm-serve", body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
