"""What the command-line tools share: one-line errors with exit codes, and the rich progress display.

Exit codes: 0 success, 2 bad input or usage (one line on stderr, no traceback), 1 internal error,
130 interrupted. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import traceback
from collections.abc import Callable

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from xllm_compiler.errors import InputError, XllmError
from xllm_compiler.oserrors import user_os_error

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def version_string(prog: str) -> str:
    """``--version``'s line, e.g. "xllm-compile 0.1.0 (torch 2.13.0)": the two versions an artifact records."""
    from xllm_compiler import __version__

    return f"{prog} {__version__} (torch {importlib.metadata.version('torch')})"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2) rather than usage + error."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def guarded(prog: str, body: Callable[[], int], debug: bool) -> int:
    """Run ``body``; turn our exceptions into a one-line message and an exit code."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            traceback.print_exc()
        os_message = user_os_error(exc)
        usage = isinstance(exc, InputError) or os_message is not None
        kind = "error" if usage else "internal error"
        detail = os_message or (str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        if not usage and not isinstance(exc, XllmError):
            detail = f"{type(exc).__name__}: {detail}"
        hint = "" if usage or debug else " (run with --debug for the traceback)"
        print(f"{prog}: {kind}: {detail}{hint}", file=sys.stderr)
        return EXIT_USAGE if usage else EXIT_INTERNAL


class RichStageListener:
    """Shows each compile stage as a spinner line that turns into a tick with its time.

    Only on a terminal, and transient: the lines vanish when the compile ends, so that a failure
    leaves exactly one line on stderr and logs never fill with spinner frames.
    """

    def __init__(self, console: Console):
        self.progress = Progress(
            SpinnerColumn(finished_text="[green]✓"),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RichStageListener:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def stage_started(self, name: str, description: str) -> None:
        self.tasks[name] = self.progress.add_task(description, total=1)

    def stage_finished(self, name: str, seconds: float) -> None:
        self.progress.update(self.tasks[name], completed=1)
