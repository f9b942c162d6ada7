"""Where the CPU kernels' build lives, how a load and a compile find out whether it is there, and who builds it.

No test here builds the kernels (a cold build takes about a minute): the extension folder is faked and
torch's builder stubbed where a build would start.
"""

from __future__ import annotations

import pytest
import torch.utils.cpp_extension

from xllm_compiler.ops import native


@pytest.fixture
def empty_extension_dir(tmp_path, monkeypatch):
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    monkeypatch.delenv("XLLM_NATIVE_KERNELS", raising=False)
    return extensions


def test_is_built_finds_the_library_in_the_extension_dir(empty_extension_dir):
    name = native.extension_name()
    assert native.build_directory() == empty_extension_dir / name
    assert not native.is_built() and native.needs_build()
    (empty_extension_dir / name / f"{name}{torch.utils.cpp_extension.LIB_EXT}").write_bytes(b"")
    assert native.is_built() and not native.needs_build()


def test_a_build_is_keyed_by_the_sources(monkeypatch, tmp_path):
    before = native.extension_name()
    changed = tmp_path / "changed.cpp"
    changed.write_text("// another source\n")
    monkeypatch.setattr(native, "SOURCES", [*native.SOURCES, changed])
    assert native.extension_name() != before


def test_disabled_kernels_need_no_build(empty_extension_dir, monkeypatch):
    monkeypatch.setenv("XLLM_NATIVE_KERNELS", "0")
    assert not native.needs_build()
    assert native.native_kernels.__wrapped__() is None
    assert not any(empty_extension_dir.iterdir())  # nothing built, nothing started


def test_a_load_that_must_build_says_so_first(empty_extension_dir, monkeypatch, capfd):
    def fake_load(**kwargs):
        assert "building the CPU kernels" in capfd.readouterr().err  # announced before the build starts
        return "module"

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    assert native.native_kernels.__wrapped__() == "module"


def test_a_load_with_a_cached_build_says_nothing(empty_extension_dir, monkeypatch, capfd):
    monkeypatch.setattr(native, "is_built", lambda: True)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kwargs: "module")
    assert native.native_kernels.__wrapped__() == "module"
    assert capfd.readouterr().err == ""


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next(empty_extension_dir, monkeypatch):
    """torch's builder waits for ever while its ``lock`` file exists; a build killed part-way leaves one."""
    stale = native.build_directory() / "lock"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"")

    def fake_load(**kwargs):
        assert not stale.exists()  # cleared before torch's builder looks for it
        return "module"

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    assert native.native_kernels.__wrapped__() == "module"


def test_builds_take_turns_on_an_flock(empty_extension_dir):
    from filelock import FileLock, Timeout

    with native.exclusive_build(native.build_directory()):
        other = FileLock(str(empty_extension_dir / f"{native.extension_name()}.flock"), timeout=0.05)
        with pytest.raises(Timeout):
            other.acquire()
    other.acquire()
    other.release()


@pytest.fixture(scope="module")
def llama_dir(checkpoints):
    return checkpoints.checkpoint("LlamaForCausalLM")[0]


def _stages(report) -> list[str]:
    return [s["name"] for s in report["stages"]]


def test_compile_builds_missing_kernels_in_a_stage_of_its_own(llama_dir, tmp_path, monkeypatch):
    import xllm_compiler

    builds = []
    monkeypatch.setattr(native, "needs_build", lambda: True)
    monkeypatch.setattr(native, "build_kernels", lambda: builds.append(1) or True)
    report = xllm_compiler.compile(llama_dir, tmp_path / "out")
    assert "kernels" in _stages(report) and builds == [1]


def test_compile_skips_the_kernels_stage_when_disabled(llama_dir, empty_extension_dir, tmp_path, monkeypatch):
    import xllm_compiler

    monkeypatch.setenv("XLLM_NATIVE_KERNELS", "0")
    report = xllm_compiler.compile(llama_dir, tmp_path / "out")
    assert "kernels" not in _stages(report)
    assert not any(empty_extension_dir.iterdir())
