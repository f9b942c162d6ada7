"""``xllm-cache info | clear [--key PREFIX] | prune``: see and trim the compile cache.

The cache is ``$XLLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/xllm_compiler``, else ``~/.cache/xllm_compiler``;
its size limit is ``--max-size``, else ``$XLLM_CACHE_MAX_SIZE``, else 20 GiB (see xllm_compiler/cache.py).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from xllm_compiler.cache import MAX_SIZE_ENV, CompileCache, default_cache_dir
from xllm_compiler.console import EXIT_OK, OneLineParser, guarded
from xllm_compiler.errors import OptionsError
from xllm_compiler.sizes import format_bytes, parse_size

KEY_CHARS = 12


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="xllm-cache", description="List, clear or trim the xllm-compile cache.")
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="the cache (default $XLLM_CACHE_DIR, else $XDG_CACHE_HOME/xllm_compiler, else ~/.cache/xllm_compiler)",
    )
    parser.add_argument("--max-size", metavar="SIZE", help=f"size limit, e.g. 10G (default ${MAX_SIZE_ENV}, else 20G)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{info,clear,prune}")
    commands.add_parser("info", help="list the entries, their size and last use, and the total against the limit")
    clear = commands.add_parser("clear", help="remove every entry, or those whose key starts with --key")
    clear.add_argument("--key", default="", metavar="PREFIX", help="only entries whose key starts with PREFIX")
    commands.add_parser("prune", help="evict least recently used entries until the cache is within its limit")
    return parser


def _entries(count: int) -> str:
    return f"{count} {'entry' if count == 1 else 'entries'}"


def entry_table(cache: CompileCache) -> Table:
    table = Table(show_header=True, header_style="bold")
    table.add_column("key", no_wrap=True)
    table.add_column("model", overflow="fold")
    table.add_column("dtype", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("last used", no_wrap=True)
    table.add_column("compiled from", overflow="fold")
    for e in cache.entries():
        used = datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M")
        table.add_row(e.key[:KEY_CHARS], e.model, e.dtype, format_bytes(e.bytes), used, e.source)
    return table


def summary(cache: CompileCache) -> str:
    entries = cache.entries()
    return (
        f"{_entries(len(entries))}, {format_bytes(sum(e.bytes for e in entries))} of a {format_bytes(cache.max_bytes)} "
        f"limit (--max-size, ${MAX_SIZE_ENV}); the least recently used are evicted first"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        root = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
        cache = CompileCache(root, parse_size(args.max_size, "--max-size") if args.max_size else None)
        console = Console(markup=False, highlight=False)
        if args.command == "info":
            console.print(f"compile cache {root}")
            if cache.entries():
                console.print(entry_table(cache))
        elif args.command == "clear":
            if args.key and not any(e.key.startswith(args.key) for e in cache.entries()):
                raise OptionsError(f"no entry of the compile cache {root} has a key starting with {args.key!r}")
            removed, in_use = cache.clear(args.key)
            console.print(f"removed {_entries(len(removed))} from {root}")
            if in_use:
                console.print(
                    f"kept {len(in_use)} in use by a running compile: {', '.join(k[:KEY_CHARS] for k in in_use)}"
                )
        else:
            console.print(f"evicted {_entries(len(cache.evict()))} from {root}")
        console.print(summary(cache))
        return EXIT_OK

    return guarded("xllm-cache", body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
