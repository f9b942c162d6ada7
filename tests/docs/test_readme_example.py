"""The README's quick-start transcript stays true: the bundled model prints what the README shows."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import xllm_compiler
from xllm_compiler import run

ROOT = Path(__file__).resolve().parents[2]


def transcript() -> tuple[list[str], str]:
    """The ``$ xllm-run ...`` line of the README's quick start (as argv) and the line printed under it."""
    command, printed = re.search(r"^\$ (xllm-run .*)\n(.*)$", (ROOT / "README.md").read_text(), flags=re.M).groups()
    return shlex.split(command)[1:], printed


def test_quick_start_prints_what_the_readme_shows(tmp_path, capsys):
    argv, printed = transcript()
    artifact = tmp_path / "tiny-llama"
    xllm_compiler.compile(ROOT / "tools" / "tiny-llama", artifact, cache_dir="")
    assert argv[0] == "out/tiny-llama"
    assert run.main([str(artifact), *argv[1:]]) == 0
    assert capsys.readouterr().out.rstrip("\n") == printed
