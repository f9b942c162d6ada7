"""The ``npu`` extra resolves against our torch: ``pip install --dry-run -e ".[npu]"`` picks the torch_npu built
for this torch and installs no torch (alone, an unpinned torch_npu resolves to 2.14.0, which pulls torch 2.14.0
and a CUDA stack; there is no ``torchair`` distribution: it ships inside torch_npu). pip reads the wheels'
metadata only: no multi-GB download. Needs the package index; skipped where pip finds no torch_npu at all
(offline, or a mirror without it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_npu_extra_resolves_without_replacing_torch(tmp_path):
    report = tmp_path / "report.json"
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-build-isolation", "--retries", "0"]
    command = [*pip, "--timeout", "20", "--report", str(report), "-e", f"{ROOT}[npu]"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    unreachable = [line for line in done.stderr.splitlines() if "torch_npu" in line and "(from versions: none)" in line]
    if done.returncode != 0 and unreachable:
        pytest.skip("pip finds no torch_npu: the package index is unreachable from here")
    assert done.returncode == 0, done.stderr
    resolved = json.loads(report.read_text())["install"]
    installs = {item["metadata"]["name"].lower().replace("-", "_"): item["metadata"]["version"] for item in resolved}
    assert "torch" not in installs, f"the npu extra replaces torch {torch.__version__} with {installs['torch']}"
    assert installs["torch_npu"].split(".")[:2] == torch.__version__.split(".")[:2]
