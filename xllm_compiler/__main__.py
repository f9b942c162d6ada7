"""``python -m xllm_compiler COMMAND ...``: every command-line tool behind one entry point, as ``vllm serve``
or ``python -m pip`` do; for where the console scripts are not on PATH (a venv not activated, a cluster
job). ``python -m xllm_compiler compile ...`` is ``xllm-compile ...``, ``run`` is ``xllm-run``, ``serve`` is
``xllm-serve`` and ``cache`` is ``xllm-cache``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from xllm_compiler.console import OneLineParser, version_string

#: command -> (module whose ``main(argv)`` runs it, what it does). Imported only when chosen.
COMMANDS = {
    "compile": ("xllm_compiler.cli", "compile a checkpoint into an artifact (xllm-compile)"),
    "run": ("xllm_compiler.run", "generate with a compiled artifact (xllm-run)"),
    "serve": ("xllm_compiler.serve.cli", "serve an artifact over an OpenAI-compatible HTTP API (xllm-serve)"),
    "cache": ("xllm_compiler.cache_cli", "list, clear or trim the compile cache (xllm-cache)"),
}


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="python -m xllm_compiler",
        description="xllm_compiler's command-line tools; 'python -m xllm_compiler COMMAND --help' for each.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<10}{what}" for name, (_, what) in COMMANDS.items()),
    )
    parser.add_argument("--version", action="version", version=version_string("xllm_compiler"))
    parser.add_argument(
        "command",
        choices=list(COMMANDS),
        metavar="{" + ",".join(COMMANDS) + "} ...",
        help="the tool, then its arguments",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Only the first word is ours (--help, --version or a command); the rest belongs to the command.
    command = build_parser().parse_args(argv[:1]).command
    module, _ = COMMANDS[command]
    return importlib.import_module(module).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
