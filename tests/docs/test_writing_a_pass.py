"""docs/writing-a-pass.md stays true: its Python blocks run, in order, as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "writing-a-pass.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_worked_example_runs_as_written(monkeypatch):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) == 3, "the page has the pass, its test, and the run on a real model"
    example = "\n".join(blocks)
    assert len(blocks[0].strip().splitlines()) < 60, "the fusion itself takes under 60 lines"
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "writing_a_pass"}
    exec(compile(example, str(DOC), "exec"), namespace)  # our own documentation, not artifact data
    assert namespace["select_rows_example"].name == "select_rows_example"
    assert os.path.isdir(namespace["out"])
