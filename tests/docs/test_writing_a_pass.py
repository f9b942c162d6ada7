"""docs/writing-a-pass.md stays true: its Python blocks run, in order, as written, and the report line
it shows is what the run reports."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "writing-a-pass.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def shown_report_line(text: str) -> dict:
    """The ``report.json`` entry the page prints after the run (a plain code block of one JSON line)."""
    return json.loads(re.search(r"```\n(\{.*\})\n```", text).group(1))


def test_worked_example_runs_as_written(monkeypatch):
    text = DOC.read_text()
    blocks = python_blocks(text)
    assert len(blocks) == 3, "the page has the pass, its test, and the run on a real model"
    assert len(blocks[0].strip().splitlines()) < 60, "the fusion itself takes under 60 lines"
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "writing_a_pass"}
    exec(compile("\n".join(blocks), str(DOC), "exec"), namespace)  # our own documentation, not artifact data
    assert namespace["fuse_written_out_silu"].name == "fuse_written_out_silu"
    assert os.path.isdir(namespace["out"])
    shown, entry = shown_report_line(text), namespace["entry"]
    assert {k: v for k, v in shown.items() if k != "seconds"} == {k: v for k, v in entry.items() if k != "seconds"}
