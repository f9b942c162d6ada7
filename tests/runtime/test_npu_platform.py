"""The NPU platform without an NPU: every way ``import torch_npu`` fails on a machine without CANN gives one
line naming what is missing, at compile and at load; 'auto' still picks cpu; attention is lowered by phase.

The failures are simulated (torch_npu is never installed in this environment: without CANN it breaks
``import torch`` for everyone); ``test_real_torch_npu_without_cann`` runs the real thing where a throwaway
venv with torch_npu is named by XLLM_TEST_NPU_PYTHON (README.md, "Devices").
"""

from __future__ import annotations

import importlib
import os
import subprocess

import pytest
import torch

import xllm_compiler
from xllm_compiler import cli
from xllm_compiler.errors import DeviceError
from xllm_compiler.ops import KERNELS, OUT_FORMS
from xllm_compiler.ops.attention import paged_attention_kernel
from xllm_compiler.runtime.platform import get_platform, npu
from xllm_compiler.runtime.platform.lowering import NPU_LOWERING
from xllm_compiler.testing import trace

HCCL = "libhccl.so: cannot open shared object file: No such file or directory"
WITHOUT_CANN = (
    "device 'npu': torch_npu 2.13.0 is installed but cannot load libhccl.so: the CANN toolkit is not installed "
    "or not sourced (source /usr/local/Ascend/ascend-toolkit/set_env.sh)"
)


@pytest.fixture
def torch_npu_fails(monkeypatch):
    """Make ``import torch_npu`` raise what the test sets (``fail(exc)``), torch_npu 2.13.0 'installed'."""
    calls = []

    def fail(exc: BaseException, version: str = "2.13.0") -> list[str]:
        real_import = importlib.import_module

        def import_module(name, *args):
            if name != "torch_npu":
                return real_import(name, *args)
            calls.append(name)
            raise exc

        monkeypatch.setattr(npu.importlib, "import_module", import_module)
        monkeypatch.setattr(npu.importlib.metadata, "version", lambda name: version)
        npu.import_torch_npu.cache_clear()
        return calls

    yield fail
    npu.import_torch_npu.cache_clear()


def _chained(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    "exc",
    [
        ImportError(HCCL),
        OSError(HCCL),
        # What `import torch` raises when its backend autoload meets torch_npu without CANN.
        _chained(RuntimeError("Failed to load the backend extension: torch_npu."), ImportError(HCCL)),
    ],
    ids=["import-error", "os-error", "autoload-runtime-error"],
)
def test_without_cann_names_the_missing_library(torch_npu_fails, exc):
    torch_npu_fails(exc)
    assert not npu.NpuPlatform().is_available()
    with pytest.raises(DeviceError) as raised:
        get_platform("npu")
    assert str(raised.value) == WITHOUT_CANN
    assert get_platform("auto").name == "cpu"


def test_not_installed(torch_npu_fails):
    torch_npu_fails(ModuleNotFoundError("No module named 'torch_npu'", name="torch_npu"))
    with pytest.raises(DeviceError, match=r"needs torch_npu, which is not installed \(pip install"):
        get_platform("npu")


def test_a_torch_npu_for_another_torch(torch_npu_fails):
    torch_npu_fails(ImportError("undefined symbol: _ZN3c10"), version="2.14.0")
    with pytest.raises(DeviceError, match=r"torch_npu 2\.14\.0 is installed but is built for another torch"):
        get_platform("npu")


def test_any_other_import_failure_is_quoted(torch_npu_fails):
    torch_npu_fails(RuntimeError("Two accelerators cannot be used at the same time\nmore"))
    message = npu.NpuPlatform().unavailable_reason()
    assert message == (
        "device 'npu': torch_npu 2.13.0 is installed but failed to import "
        "(RuntimeError: Two accelerators cannot be used at the same time)"
    )


def test_the_import_is_tried_once(torch_npu_fails):
    """A half-imported torch_npu fails differently the second time: the first verdict is kept."""
    calls = torch_npu_fails(ImportError(HCCL))
    for _ in range(3):
        assert not npu.NpuPlatform().is_available()
        assert npu.NpuPlatform().unavailable_reason() == WITHOUT_CANN
    assert calls == ["torch_npu"]


def test_compile_and_load_say_what_is_missing(torch_npu_fails, checkpoints, tmp_path, capsys):
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    artifact = checkpoints.artifact(model_dir)  # compiled for cpu before the failure is simulated
    torch_npu_fails(ImportError(HCCL))
    capsys.readouterr()
    assert cli.main([str(model_dir), str(tmp_path / "out"), "--device", "npu"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(WITHOUT_CANN)
    with pytest.raises(DeviceError) as raised:
        xllm_compiler.load(artifact, device="npu")
    assert str(raised.value) == WITHOUT_CANN


def test_every_table_entry_has_a_kernel():
    """The table covers every op a graph can hold (an out form without an NPU kernel stays functional on NPU),
    and the platform binds every entry: one kernel for all graphs, or one per phase."""
    no_npu_out_form = {OUT_FORMS[op][0] for op in OUT_FORMS if op not in NPU_LOWERING.out_forms()}
    assert set(KERNELS) - no_npu_out_form == set(NPU_LOWERING.kernels)
    phased = {op for op, kernels in NPU_LOWERING.kernels.items() if any(k.phase for k in kernels)}
    assert set(npu.KERNELS) == set(NPU_LOWERING.kernels) - phased
    assert all(set(kernels) == phased for kernels in npu.PHASE_KERNELS.values())


def _attention_graph():
    def step(query, key, value, kv_cache, slot_mapping, query_lens, seq_lens, block_tables):
        return torch.ops.xllm.paged_attention(
            query, key, value, kv_cache, slot_mapping, query_lens, seq_lens, block_tables, 0.5, 0
        )

    return trace(step, *_attention_inputs(sliding_window=0)[:8]).graph


def test_lower_picks_attention_kernels_by_phase():
    graphs = {name: _attention_graph() for name in ("decode_4", "prefill_64", "dynamic")}
    npu.NpuPlatform().lower(graphs, {})
    for name, phase in (("decode_4", "decode"), ("prefill_64", "prefill"), ("dynamic", "prefill")):
        (node,) = [n for n in graphs[name].nodes if n.op == "call_function"]
        assert node.target is npu.PHASE_KERNELS[phase]["xllm::paged_attention"]


def _attention_inputs(sliding_window: int):
    torch.manual_seed(0)
    seqs, heads, kv_heads, dim, block_size = 3, 4, 2, 8, 4
    seq_lens = torch.tensor([5, 9, 2], dtype=torch.int32)
    block_tables = torch.tensor([[1, 2, 0], [3, 4, 5], [6, 0, 0]], dtype=torch.int32)
    last = seq_lens.long() - 1  # each sequence's new token, at its last position
    slots = block_tables.long().gather(1, (last // block_size)[:, None])[:, 0] * block_size + last % block_size
    return (
        torch.randn(seqs, heads, dim),
        torch.randn(seqs, kv_heads, dim),
        torch.randn(seqs, kv_heads, dim),
        torch.randn(2, 8, block_size, kv_heads, dim),
        slots,
        torch.ones(seqs, dtype=torch.int32),
        seq_lens,
        block_tables,
        0.5,
        sliding_window,
    )


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_a_sliding_window_keeps_the_composite(phase):
    """Neither NPU kernel's documented decode path takes a window: those steps run the torch composite
    (on CPU tensors here, so no NPU kernel is reached)."""
    inputs = _attention_inputs(sliding_window=3)
    expected_cache = inputs[3].clone()
    expected = paged_attention_kernel(*inputs[:3], expected_cache, *inputs[4:])
    got = npu.PHASE_KERNELS[phase]["xllm::paged_attention"](*inputs)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(inputs[3], expected_cache)


@pytest.mark.skipif(not os.environ.get("XLLM_TEST_NPU_PYTHON"), reason="XLLM_TEST_NPU_PYTHON names no venv")
def test_real_torch_npu_without_cann(tmp_path):
    """In a venv with torch_npu and no CANN: importing us (and torch) works, 'auto' is cpu, and the npu
    device is refused in one line naming libhccl.so."""
    script = (
        "import xllm_compiler, torch\n"
        "from xllm_compiler.runtime.platform import get_platform\n"
        "from xllm_compiler.errors import DeviceError\n"
        "assert get_platform('auto').name == 'cpu'\n"
        "try:\n    get_platform('npu')\nexcept DeviceError as e:\n    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DEVICE_BACKEND_AUTOLOAD"}
    done = subprocess.run(
        [os.environ["XLLM_TEST_NPU_PYTHON"], "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "cannot load libhccl.so: the CANN toolkit is not installed" in done.stdout
