"""tools/bench_moe.py runs its three systems on one row and prints a line per row count."""

from __future__ import annotations

import sys

import pytest

from tools import bench_moe
from xllm_compiler.ops.native import native_kernels


@pytest.mark.skipif(native_kernels() is None, reason="no native kernels in this build")
def test_one_row_pass_prints_each_system(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_moe.py", "--rows", "1", "--dtype", "float32", "--repeats", "1"])
    bench_moe.main()
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("float32  rows    1:")
    assert all(system in line for system in ("fused (packed)", "reference", "reference, dense", "GB/s of experts"))
