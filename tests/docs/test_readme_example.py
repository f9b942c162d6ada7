"""The README stays true on the bundled model: its quick-start transcript prints what the README shows,
and its node counts are what the compile reports."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import xllm_compiler
from xllm_compiler import run

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


@pytest.fixture(scope="module")
def bundled(tmp_path_factory) -> tuple[Path, dict]:
    """tools/tiny-llama compiled as the quick start does: (the artifact, its report)."""
    artifact = tmp_path_factory.mktemp("readme") / "tiny-llama"
    report = xllm_compiler.compile(ROOT / "tools" / "tiny-llama", artifact, cache_dir="")
    return artifact, report


def transcript() -> tuple[list[str], str]:
    """The ``$ xllm-run ...`` line of the README's quick start (as argv) and the line printed under it."""
    command, printed = re.search(r"^\$ (xllm-run .*)\n(.*)$", README.read_text(), flags=re.M).groups()
    return shlex.split(command)[1:], printed


def test_quick_start_prints_what_the_readme_shows(bundled, capsys):
    artifact, _ = bundled
    argv, printed = transcript()
    assert argv[0] == "out/tiny-llama"
    assert run.main([str(artifact), *argv[1:]]) == 0
    assert capsys.readouterr().out.rstrip("\n") == printed


def test_node_counts_are_what_the_compile_reports(bundled):
    _, report = bundled
    stated = re.search(r"On the bundled model: (\d+) ATen nodes traced, (\d+) after the passes\.", README.read_text())
    assert stated, "the README's sentence on the bundled model's node counts is gone or reworded"
    graph = report["graph"]
    assert [int(n) for n in stated.groups()] == [graph["nodes_captured"], graph["nodes_after_passes"]]
