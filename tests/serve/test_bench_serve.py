"""tools/bench_serve.py runs end to end with tiny counts (a smoke test: no figure is checked, only its shape)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench_serve.py"


def test_bench_serve_reports_every_rate(chat_artifact, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--artifact", str(chat_artifact), "--rates", "50", "--requests", "3", "--prompt-tokens", "8"]
    argv += ["--max-tokens", "3", "--json", str(out)]
    result = subprocess.run([sys.executable, str(BENCH), *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(out.read_text())["rates"]
    assert row["rate"] == 50 and row["completed"] == 3 and row["tokens_per_s"] > 0
    assert "ttft_p50_ms" in result.stdout
