"""Bad input of the public contract, on the CLI (xllm-compile, xllm-run) and on the Python API.

The contract: exit 0 on success, 2 on bad input or usage, 1 on an internal error (130 when
interrupted). Bad input prints exactly one line on stderr, starting with the program name, never a
traceback; the API raises ``InputError`` subclasses (ValueErrors) whose message names the file,
tensor, option or shape at fault. A failed or interrupted compile leaves nothing behind: no OUT_DIR,
no hidden staging folder, and an existing OUT_DIR untouched.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import xllm_compiler
from tests.cli_calls import assert_one_line, call
from tests.hf_oracle import TINY
from xllm_compiler import cli, run
from xllm_compiler.errors import (
    ArtifactError,
    CheckpointError,
    ConfigError,
    DeviceError,
    InputError,
    KVCacheExhaustedError,
    OptionsError,
    OutputDirError,
    RequestError,
)

VOCAB = TINY["vocab_size"]
MAX_POSITIONS = TINY["max_position_embeddings"]
MAX_SEQ_LEN = 64
SMALL = dict(decode_buckets=[1, 2], prefill_buckets=[16], max_seq_len=MAX_SEQ_LEN)
SMALL_ARGS = ["--decode-buckets", "1,2", "--prefill-buckets", "16", "--max-seq-len", str(MAX_SEQ_LEN)]
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
VICTIM = "model.layers.1.self_attn.k_proj.weight"
WEIGHTS = "model.safetensors"


# -- helpers --------------------------------------------------------------------------------------


def assert_message(exc: BaseException, *fragments) -> None:
    assert isinstance(exc, InputError) and isinstance(exc, ValueError), type(exc)
    for fragment in fragments:
        assert str(fragment) in str(exc), f"{fragment!r} not in {str(exc)!r}"


def leftovers(out_dir: Path) -> list[str]:
    """Hidden staging (``.NAME.partial-*``) or retired (``.NAME.old-*``) folders beside OUT_DIR."""
    if not out_dir.parent.is_dir():
        return []
    return sorted(p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}."))


def assert_nothing_left(out_dir: Path) -> None:
    assert not out_dir.exists(), f"{out_dir} was left behind: {sorted(out_dir.rglob('*'))}"
    assert leftovers(out_dir) == []


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the sha256 of each file: byte-identical trees compare equal."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(root.rglob("*"))
    }


def fill_dir(path: Path) -> None:
    (path / "sub").mkdir(parents=True)
    (path / "keep.txt").write_text("precious\n")
    (path / "sub" / "data.bin").write_bytes(bytes(range(256)) * 4)


def edit_config(model_dir: Path, edit: Callable[[dict], None]) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    edit(config)
    (model_dir / "config.json").write_text(json.dumps(config))


def edit_weights(model_dir: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = model_dir / WEIGHTS
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def unavailable(device: str) -> bool:
    if device == "cuda":
        return not torch.cuda.is_available()
    return importlib.util.find_spec("torch_npu") is None


def script(name: str, module: str) -> list[str]:
    """The installed console script, or ``python -m module`` where it is not on this interpreter's path."""
    candidate = Path(sys.executable).with_name(name)
    if candidate.is_file():
        return [str(candidate)]
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", module]


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(checkpoints) -> Path:
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    return model_dir


@pytest.fixture
def model_copy(llama_dir, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, free to damage."""
    return Path(shutil.copytree(llama_dir, tmp_path / "model"))


@pytest.fixture(scope="module")
def artifact(checkpoints, llama_dir) -> Path:
    """A small compiled artifact (max_seq_len 64, no tokenizer.json)."""
    return checkpoints.artifact(llama_dir, **SMALL)


@pytest.fixture(scope="module")
def model(artifact):
    return xllm_compiler.load(artifact)


# -- compile: damaged checkpoints -----------------------------------------------------------------
# Each case damages a copy of the checkpoint and returns (error class, fragments the message must hold).


def missing_model_dir(d: Path):
    shutil.rmtree(d)
    return ConfigError, [d, "does not exist"]


def missing_config(d: Path):
    (d / "config.json").unlink()
    return ConfigError, [d / "config.json", "not found"]


def invalid_json(d: Path):
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    return ConfigError, [d / "config.json", "not valid JSON"]


def config_not_an_object(d: Path):
    (d / "config.json").write_text("[1, 2, 3]")
    return ConfigError, [d / "config.json", "JSON object"]


def config_lacks_hidden_size(d: Path):
    edit_config(d, lambda c: c.pop("hidden_size"))
    return ConfigError, ["hidden_size"]


def unsupported_architecture(d: Path):
    edit_config(d, lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    return ConfigError, ["GPT2LMHeadModel", "not supported", *SUPPORTED]


def no_architectures(d: Path):
    edit_config(d, lambda c: c.pop("architectures"))
    return ConfigError, ["architectures", *SUPPORTED]


def missing_tensor(d: Path):
    edit_weights(d, lambda t: t.pop(VICTIM))
    return CheckpointError, [VICTIM, "missing", WEIGHTS]


def wrong_shape(d: Path):
    expected = list(load_file(str(d / WEIGHTS))[VICTIM].shape)
    found = [expected[0] + 3, expected[1]]
    edit_weights(d, lambda t: t.update({VICTIM: torch.zeros(found)}))
    return CheckpointError, [WEIGHTS, VICTIM, f"has shape {found}", f"expected {expected}"]


def integer_tensor(d: Path):
    edit_weights(d, lambda t: t.update({VICTIM: t[VICTIM].to(torch.int32)}))
    return CheckpointError, [WEIGHTS, VICTIM, "int32"]


def truncated_weights(d: Path):
    truncate(d / WEIGHTS, (d / WEIGHTS).stat().st_size // 2)
    return CheckpointError, [d / WEIGHTS]


def truncated_header(d: Path):
    truncate(d / WEIGHTS, 5)
    return CheckpointError, [d / WEIGHTS]


def no_safetensors(d: Path):
    (d / WEIGHTS).unlink()
    return CheckpointError, ["no *.safetensors", d]


DAMAGE = [
    missing_model_dir,
    missing_config,
    invalid_json,
    config_not_an_object,
    config_lacks_hidden_size,
    unsupported_architecture,
    no_architectures,
    missing_tensor,
    wrong_shape,
    integer_tensor,
    truncated_weights,
    truncated_header,
    no_safetensors,
]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_compile_refuses_damaged_checkpoint_api(model_copy, tmp_path, damage):
    error, fragments = damage(model_copy)
    out = tmp_path / "out"
    with pytest.raises(error) as info:
        xllm_compiler.compile(model_copy, out, **SMALL)
    assert_message(info.value, *fragments)
    assert_nothing_left(out)


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_compile_refuses_damaged_checkpoint_cli(model_copy, tmp_path, capsys, damage):
    _, fragments = damage(model_copy)
    out = tmp_path / "out"
    rc, stdout, err = call(cli.main, [model_copy, out, "--quiet", *SMALL_ARGS], capsys)
    assert rc == 2
    assert stdout == ""
    assert_one_line(err, "xllm-compile", "error:", *fragments)
    assert_nothing_left(out)


def test_sharded_checkpoint_with_missing_shard(checkpoints, tmp_path, capsys):
    sharded, _ = checkpoints.checkpoint("LlamaForCausalLM", max_shard_size="100KB")
    model_dir = Path(shutil.copytree(sharded, tmp_path / "model"))
    shard = sorted(model_dir.glob("*.safetensors"))[-1]
    shard.unlink()
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as info:
        xllm_compiler.compile(model_dir, out, **SMALL)
    assert_message(info.value, shard.name, "model.safetensors.index.json")
    rc, _, err = call(cli.main, [model_dir, out, "--quiet"], capsys)
    assert rc == 2
    assert_one_line(err, "xllm-compile", shard.name)
    assert_nothing_left(out)


def test_sharded_checkpoint_with_invalid_index(checkpoints, tmp_path):
    sharded, _ = checkpoints.checkpoint("LlamaForCausalLM", max_shard_size="100KB")
    model_dir = Path(shutil.copytree(sharded, tmp_path / "model"))
    (model_dir / "model.safetensors.index.json").write_text("{}")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as info:
        xllm_compiler.compile(model_dir, out, **SMALL)
    assert_message(info.value, "model.safetensors.index.json")
    assert_nothing_left(out)


# -- compile: bad options -------------------------------------------------------------------------

BAD_OPTIONS = {
    "dtype": (dict(dtype="int8"), ["dtype", "int8", "float32", "bfloat16"]),
    "device": (dict(device="tpu"), ["device", "tpu", "cpu"]),
    "decode-not-int": (dict(decode_buckets="1,x"), ["decode_buckets", "1,x"]),
    "decode-zero": (dict(decode_buckets="0"), ["decode_buckets", "0"]),
    "decode-empty-string": (dict(decode_buckets=""), ["decode_buckets"]),
    "decode-empty-list": (dict(decode_buckets=[]), ["decode_buckets"]),
    "decode-negative": (dict(decode_buckets=[1, -2]), ["decode_buckets", "-2"]),
    "decode-float": (dict(decode_buckets=[1.5]), ["decode_buckets", "1.5"]),
    "prefill-not-int": (dict(prefill_buckets="1,x"), ["prefill_buckets", "1,x"]),
    "prefill-zero": (dict(prefill_buckets="0"), ["prefill_buckets", "0"]),
    "prefill-empty-string": (dict(prefill_buckets=""), ["prefill_buckets"]),
    "prefill-above-max-seq-len": (
        dict(prefill_buckets=[16, 128], max_seq_len=64),
        ["prefill bucket 128", "max_seq_len 64"],
    ),
    "max-seq-len-above-positions": (
        dict(max_seq_len=MAX_POSITIONS + 1),
        [f"max_seq_len {MAX_POSITIONS + 1}", f"max_position_embeddings {MAX_POSITIONS}"],
    ),
    "max-seq-len-zero": (dict(max_seq_len=0), ["max_seq_len", "0"]),
    "max-seq-len-string": (dict(max_seq_len="64"), ["max_seq_len", "'64'"]),
    "block-size-zero": (dict(block_size=0), ["block_size", "0"]),
    "micro-batch-min-tokens-zero": (dict(micro_batch_min_tokens=0), ["micro_batch_min_tokens", "0"]),
    "unknown-pass": (dict(passes="bogus_pass"), ["unknown pass", "bogus_pass", "known:"]),
    "unknown-pass-in-list": (dict(passes=["eliminate_dead_code", "bogus_pass"]), ["unknown pass", "bogus_pass"]),
    "unknown-disabled-pass": (dict(disable_passes="bogus_pass"), ["unknown pass", "bogus_pass"]),
    "unknown-disable-pass-alias": (dict(disable_pass=["bogus_pass"]), ["unknown pass", "bogus_pass"]),
    "unknown-keyword": (dict(bogus_option=1), ["unknown compile option", "bogus_option", "dtype"]),
}


@pytest.mark.parametrize("options, fragments", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_compile_refuses_bad_option_api(llama_dir, tmp_path, options, fragments):
    out = tmp_path / "out"
    with pytest.raises(OptionsError) as info:
        xllm_compiler.compile(llama_dir, out, **{**SMALL, **options})
    assert_message(info.value, *fragments)
    if "unknown pass" in fragments:
        from xllm_compiler.passes.manager import default_pipeline

        assert_message(info.value, *(p.name for p in default_pipeline()))
    assert_nothing_left(out)


BAD_ARGS = {
    "dtype": (["--dtype", "int8"], ["--dtype", "int8"]),
    "device": (["--device", "tpu"], ["--device", "tpu"]),
    "decode-not-int": (["--decode-buckets", "1,x"], ["decode_buckets", "1,x"]),
    "decode-zero": (["--decode-buckets", "0"], ["decode_buckets", "0"]),
    "decode-empty": (["--decode-buckets", ""], ["decode_buckets"]),
    "decode-negative": (["--decode-buckets=1,-2"], ["decode_buckets", "-2"]),
    "prefill-not-int": (["--prefill-buckets", "1,x"], ["prefill_buckets", "1,x"]),
    "prefill-zero": (["--prefill-buckets", "0"], ["prefill_buckets", "0"]),
    "prefill-empty": (["--prefill-buckets", ""], ["prefill_buckets"]),
    "prefill-above-max-seq-len": (["--prefill-buckets", "16,128", "--max-seq-len", "64"], ["128", "64"]),
    "max-seq-len-above-positions": (["--max-seq-len", str(MAX_POSITIONS + 1)], [MAX_POSITIONS + 1, MAX_POSITIONS]),
    "max-seq-len-not-int": (["--max-seq-len", "abc"], ["--max-seq-len", "abc"]),
    "max-seq-len-zero": (["--max-seq-len", "0"], ["max_seq_len", "0"]),
    "block-size-zero": (["--block-size", "0"], ["block_size", "0"]),
    "micro-batch-min-tokens-zero": (["--micro-batch-min-tokens", "0"], ["micro_batch_min_tokens", "0"]),
    "unknown-pass": (["--passes", "bogus_pass"], ["unknown pass", "bogus_pass"]),
    "unknown-disabled-pass": (["--disable-pass", "bogus_pass"], ["unknown pass", "bogus_pass"]),
    "unknown-flag": (["--bogus-flag"], ["--bogus-flag"]),
}


@pytest.mark.parametrize("args, fragments", BAD_ARGS.values(), ids=BAD_ARGS.keys())
def test_compile_refuses_bad_option_cli(llama_dir, tmp_path, capsys, args, fragments):
    out = tmp_path / "out"
    rc, stdout, err = call(cli.main, [llama_dir, out, "--quiet", *args], capsys)
    assert rc == 2
    assert stdout == ""
    assert_one_line(err, "xllm-compile", "error:", *fragments)
    assert_nothing_left(out)


@pytest.mark.parametrize(
    "args",
    [[], ["only-one-positional"], ["a", "b", "c"]],
    ids=["no-arguments", "no-out-dir", "extra-positional"],
)
def test_compile_usage_errors_cli(capsys, args):
    rc, stdout, err = call(cli.main, args, capsys)
    assert rc == 2
    assert stdout == ""
    assert_one_line(err, "xllm-compile", "error:", "--help")


@pytest.mark.parametrize(
    "args",
    [["--decode-buckets", "1,x"], ["--prefill-buckets", ""], ["--block-size", "0"], ["--dtype", "int8"]],
    ids=["decode-bucket", "prefill-bucket", "block-size", "dtype"],
)
def test_option_errors_are_one_line_without_quiet(llama_dir, tmp_path, capsys, args):
    """Options refused before the progress display starts: one line in the default (not --quiet) mode too."""
    out = tmp_path / "out"
    rc, _, err = call(cli.main, [llama_dir, out, *args], capsys)
    assert rc == 2
    assert_one_line(err, "xllm-compile", "error:")
    assert_nothing_left(out)


def default_mode_case(case: str, model_dir: Path, out: Path) -> tuple[list, list[str]]:
    """(fragments of the error, extra CLI arguments) for one bad input, applied to ``model_dir``/``out``."""
    if case == "missing-model-dir":
        return missing_model_dir(model_dir)[1], []
    if case == "missing-tensor":
        return missing_tensor(model_dir)[1], []
    if case == "max-seq-len-above-positions":
        return [MAX_POSITIONS + 1], ["--max-seq-len", str(MAX_POSITIONS + 1)]
    if case == "unknown-pass":
        return ["bogus_pass"], ["--passes", "bogus_pass"]
    if case == "existing-out-dir":
        fill_dir(out)
        return [out, "--force"], []
    assert case == "unavailable-cuda"
    if not unavailable("cuda"):
        pytest.skip("cuda is available here")
    return ["'cuda'"], ["--device", "cuda"]


@pytest.mark.parametrize(
    "case",
    [
        "missing-model-dir",
        "missing-tensor",
        "max-seq-len-above-positions",
        "unknown-pass",
        "existing-out-dir",
        "unavailable-cuda",
    ],
)
def test_compile_errors_are_one_line_without_quiet(model_copy, tmp_path, capsys, case):
    out = tmp_path / "out"
    fragments, args = default_mode_case(case, model_copy, out)
    rc, _, err = call(cli.main, [model_copy, out, *SMALL_ARGS, *args], capsys)
    # What holds today: exit 2, no traceback, the error is the last line.
    assert rc == 2
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("xllm-compile: error: ") and all(str(f) in last for f in fragments), last
    # What the contract asks: nothing else on stderr.
    assert_one_line(err, "xllm-compile", "error:", *fragments)


# -- compile: devices -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda", "npu"])
def test_compile_refuses_unavailable_device(llama_dir, tmp_path, capsys, device):
    if not unavailable(device):
        pytest.skip(f"{device} is available here")
    out = tmp_path / "out"
    with pytest.raises(DeviceError) as info:
        xllm_compiler.compile(llama_dir, out, device=device, **SMALL)
    assert_message(info.value, f"'{device}'")
    assert_nothing_left(out)
    rc, _, err = call(cli.main, [llama_dir, out, "--quiet", "--device", device, *SMALL_ARGS], capsys)
    assert rc == 2
    assert_one_line(err, "xllm-compile", "error:", f"'{device}'")
    assert_nothing_left(out)


# -- compile: the output folder -------------------------------------------------------------------


def test_existing_out_dir_is_refused_without_force(llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    fill_dir(out)
    before = snapshot(out)
    with pytest.raises(OutputDirError) as info:
        xllm_compiler.compile(llama_dir, out, cache_dir="", **SMALL)  # the build path, not a cache hit
    assert_message(info.value, out, "not empty", "--force")
    assert snapshot(out) == before
    rc, _, err = call(cli.main, [llama_dir, out, "--quiet", *SMALL_ARGS], capsys)
    assert rc == 2
    assert_one_line(err, "xllm-compile", "error:", out, "--force")
    assert snapshot(out) == before
    assert leftovers(out) == []


def test_out_dir_that_is_a_file_is_refused_even_with_force(llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a folder\n")
    with pytest.raises(OutputDirError) as info:
        xllm_compiler.compile(llama_dir, out, force=True, cache_dir="", **SMALL)
    assert_message(info.value, out, "not a directory")
    rc, _, err = call(cli.main, [llama_dir, out, "--force", "--quiet", *SMALL_ARGS], capsys)
    assert rc == 2
    assert_one_line(err, "xllm-compile", out)
    assert out.read_text() == "not a folder\n"
    assert leftovers(out) == []


def test_empty_out_dir_is_accepted(llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    xllm_compiler.compile(llama_dir, out, **SMALL)
    assert (out / "manifest.json").is_file()
    assert leftovers(out) == []


def test_force_replaces_existing_out_dir(llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    fill_dir(out)
    rc, _, err = call(cli.main, [llama_dir, out, "--force", "--quiet", *SMALL_ARGS], capsys)
    assert rc == 0, err
    assert err == ""
    assert not (out / "keep.txt").exists() and not (out / "sub").exists()
    assert (out / "manifest.json").is_file()
    assert leftovers(out) == []
    assert len(xllm_compiler.load(out).generate([[1, 2, 3]], max_new_tokens=2, ignore_eos=True)[0]) == 2


def test_force_refuses_to_replace_the_model_dir(model_copy, capsys):
    before = snapshot(model_copy)
    rc, _, _ = call(cli.main, [model_copy, model_copy, "--force", "--quiet", *SMALL_ARGS], capsys)
    assert snapshot(model_copy) == before
    assert rc == 2


class Boom(RuntimeError):
    pass


def fail_in_write(monkeypatch, where: str, exc: type[BaseException]) -> list[list[str]]:
    """Make ``where`` (write_manifest, or the 2nd write_graph) raise ``exc``; returns what staging held then."""
    import xllm_compiler.compiler as compiler

    original = getattr(compiler, where)
    seen: list[list[str]] = []
    calls = []

    def failing(root: Path, *args, **kwargs):
        calls.append(1)
        if where == "write_graph" and len(calls) < 2:
            return original(root, *args, **kwargs)
        seen.append(sorted(str(p.relative_to(root)) for p in root.rglob("*")))
        raise exc("simulated failure in the write stage")

    monkeypatch.setattr(compiler, where, failing)
    return seen


WRITE_FAILURES = [
    pytest.param("write_manifest", Boom, id="manifest-error"),
    pytest.param("write_manifest", KeyboardInterrupt, id="manifest-interrupt"),
    pytest.param("write_graph", Boom, id="graph-error"),
    pytest.param("write_graph", KeyboardInterrupt, id="graph-interrupt"),
    pytest.param("write_manifest", OSError, id="manifest-oserror"),
]


@pytest.mark.parametrize("where, exc", WRITE_FAILURES)
def test_failure_in_write_stage_leaves_nothing(llama_dir, tmp_path, monkeypatch, where, exc):
    seen = fail_in_write(monkeypatch, where, exc)
    out = tmp_path / "out"
    with pytest.raises(exc):
        xllm_compiler.compile(llama_dir, out, cache_dir="", **SMALL)  # the build path, not a cache hit
    assert seen and "weights.safetensors" in seen[0], "the failure did not happen mid-write"
    assert_nothing_left(out)


@pytest.mark.parametrize("where, exc", WRITE_FAILURES)
def test_failure_in_write_stage_with_force_keeps_existing_out_dir(
    artifact, tmp_path, monkeypatch, llama_dir, where, exc
):
    out = Path(shutil.copytree(artifact, tmp_path / "out"))
    before = snapshot(out)
    seen = fail_in_write(monkeypatch, where, exc)
    with pytest.raises(exc):
        xllm_compiler.compile(llama_dir, out, force=True, cache_dir="", **SMALL)
    assert seen, "the failure did not happen mid-write"
    assert snapshot(out) == before
    assert leftovers(out) == []
    xllm_compiler.load(out)  # still a valid artifact


@pytest.mark.parametrize("exc", [OSError, KeyboardInterrupt], ids=["oserror", "interrupt"])
def test_failure_while_swapping_in_the_artifact_keeps_existing_out_dir(artifact, tmp_path, monkeypatch, llama_dir, exc):
    out = Path(shutil.copytree(artifact, tmp_path / "out"))
    before = snapshot(out)
    rename = Path.rename

    def failing_rename(self, target):
        if self.name.startswith(".out.partial-"):
            raise exc("simulated failure renaming the staging folder")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(exc):
        xllm_compiler.compile(llama_dir, out, force=True, cache_dir="", **SMALL)
    monkeypatch.undo()
    assert out.is_dir() and snapshot(out) == before
    assert leftovers(out) == []


@pytest.mark.parametrize(
    "exc, code, fragments",
    [(Boom, 1, ["internal error", "simulated failure", "--debug"]), (KeyboardInterrupt, 130, ["interrupted"])],
    ids=["internal-error", "interrupt"],
)
@pytest.mark.parametrize("existing", [False, True], ids=["new", "force-existing"])
def test_failure_in_write_stage_cli(llama_dir, tmp_path, capsys, monkeypatch, exc, code, fragments, existing):
    out = tmp_path / "out"
    if existing:
        fill_dir(out)
    before = snapshot(out) if existing else None
    fail_in_write(monkeypatch, "write_manifest", exc)
    rc, stdout, err = call(cli.main, [llama_dir, out, "--quiet", "--force", "--no-cache", *SMALL_ARGS], capsys)
    assert rc == code
    assert stdout == ""
    assert_one_line(err, "xllm-compile", *fragments)
    if existing:
        assert snapshot(out) == before
        assert leftovers(out) == []
    else:
        assert_nothing_left(out)


# -- compile: real processes ----------------------------------------------------------------------


@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "default"])
def test_xllm_compile_process_prints_no_traceback(tmp_path, quiet):
    missing, out = tmp_path / "no-such-model", tmp_path / "out"
    argv = [*script("xllm-compile", "xllm_compiler.cli"), str(missing), str(out), *(["--quiet"] if quiet else [])]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    error = proc.stderr.splitlines()[-1]
    assert error.startswith("xllm-compile: error: ") and str(missing) in error
    if quiet:
        assert_one_line(proc.stderr, "xllm-compile", missing, "does not exist")
    assert_nothing_left(out)


def test_xllm_run_process_prints_one_line(tmp_path):
    missing = tmp_path / "no-such-artifact"
    argv = [*script("xllm-run", "xllm_compiler.run"), str(missing), "--prompt-ids", "1,2"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert_one_line(proc.stderr, "xllm-run", "error:", missing, "does not exist")


# -- runtime: load() ------------------------------------------------------------------------------


def test_load_refuses_missing_artifact(tmp_path):
    with pytest.raises(ArtifactError) as info:
        xllm_compiler.load(tmp_path / "nope")
    assert_message(info.value, tmp_path / "nope", "does not exist")


def test_load_refuses_a_checkpoint_dir(llama_dir):
    with pytest.raises(ArtifactError) as info:
        xllm_compiler.load(llama_dir)
    assert_message(info.value, "manifest.json")


@pytest.mark.parametrize("kv_blocks", [0, 1, -4, "8", True, 2.5])
def test_load_refuses_bad_kv_blocks(artifact, kv_blocks):
    with pytest.raises(OptionsError) as info:
        xllm_compiler.load(artifact, kv_blocks=kv_blocks)
    assert_message(info.value, "kv_blocks", repr(kv_blocks))


def test_load_refuses_unknown_device(artifact):
    with pytest.raises(OptionsError) as info:
        xllm_compiler.load(artifact, device="tpu")
    assert_message(info.value, "tpu")


@pytest.mark.parametrize("device", ["cuda", "npu"])
def test_load_and_run_refuse_unavailable_device(artifact, capsys, device):
    if not unavailable(device):
        pytest.skip(f"{device} is available here")
    with pytest.raises(DeviceError) as info:
        xllm_compiler.load(artifact, device=device)
    assert_message(info.value, f"'{device}'")
    rc, stdout, err = call(run.main, [artifact, "--prompt-ids", "1,2", "--device", device], capsys)
    assert rc == 2
    assert stdout == ""
    assert_one_line(err, "xllm-run", "error:", f"'{device}'")


# -- runtime: requests ----------------------------------------------------------------------------

TOO_LONG = [1] * (MAX_SEQ_LEN - 4)

BAD_GENERATE = {
    "empty-prompt": (dict(prompts=[[]]), ["prompt 0", "empty"]),
    "second-prompt-empty": (dict(prompts=[[1, 2], []]), ["prompt 1", "empty"]),
    "negative-id": (dict(prompts=[[1, -1]]), ["-1", f"[0, {VOCAB})"]),
    "id-equals-vocab": (dict(prompts=[[VOCAB]]), [VOCAB, f"[0, {VOCAB})"]),
    "id-far-above-vocab": (dict(prompts=[[10**9]]), [10**9]),
    "float-id": (dict(prompts=[[1, 2.5]]), ["prompt 0", "not an integer"]),
    "string-id": (dict(prompts=[["1"]]), ["prompt 0", "not an integer"]),
    "none-id": (dict(prompts=[[None]]), ["prompt 0", "not an integer"]),
    "bool-id": (dict(prompts=[[True, 2]]), ["prompt 0", "not an integer"]),
    "float-tensor": (dict(prompts=[torch.tensor([1.0, 2.0])]), ["prompt 0", "not an integer"]),
    "prompts-a-string": (dict(prompts="hello"), ["list"]),
    "prompt-a-string": (dict(prompts=["hello"]), ["prompt 0", "str"]),
    "prompt-an-int": (dict(prompts=[5]), ["prompt 0", "int"]),
    "too-long": (
        dict(prompts=[TOO_LONG], max_new_tokens=5),
        [f"{len(TOO_LONG)} prompt tokens", "5 new tokens", f"max_seq_len {MAX_SEQ_LEN}"],
    ),
    "prompt-alone-too-long": (dict(prompts=[[1] * (MAX_SEQ_LEN + 1)], max_new_tokens=0), [MAX_SEQ_LEN + 1]),
    "negative-max-new-tokens": (dict(prompts=[[1]], max_new_tokens=-1), ["max_new_tokens", "-1"]),
    "float-max-new-tokens": (dict(prompts=[[1]], max_new_tokens=1.5), ["max_new_tokens", "1.5"]),
    "string-max-new-tokens": (dict(prompts=[[1]], max_new_tokens="3"), ["max_new_tokens", "'3'"]),
    "negative-temperature": (dict(prompts=[[1]], temperature=-0.5), ["temperature", "-0.5"]),
    "nan-temperature": (dict(prompts=[[1]], temperature=float("nan")), ["temperature", "nan"]),
    "inf-temperature": (dict(prompts=[[1]], temperature=float("inf")), ["temperature", "inf"]),
    "bool-temperature": (dict(prompts=[[1]], temperature=True), ["temperature", "True"]),
    "top-p-zero": (dict(prompts=[[1]], top_p=0.0), ["top_p", "0.0"]),
    "top-p-negative": (dict(prompts=[[1]], top_p=-0.1), ["top_p", "-0.1"]),
    "top-p-above-one": (dict(prompts=[[1]], top_p=1.5), ["top_p", "1.5"]),
    "top-p-nan": (dict(prompts=[[1]], top_p=float("nan")), ["top_p", "nan"]),
}


@pytest.mark.parametrize("kwargs, fragments", BAD_GENERATE.values(), ids=BAD_GENERATE.keys())
def test_generate_refuses_bad_request(model, kwargs, fragments):
    with pytest.raises(RequestError) as info:
        model.generate(**kwargs)
    assert_message(info.value, *fragments)


BAD_LOGITS = {
    "empty-prompt": ([[]], ["prompt 0", "empty"]),
    "negative-id": ([[-1]], ["-1", f"[0, {VOCAB})"]),
    "id-equals-vocab": ([[3, VOCAB]], [VOCAB]),
    "float-id": ([[1.5]], ["not an integer"]),
    "too-long": ([[1] * (MAX_SEQ_LEN + 1)], [MAX_SEQ_LEN + 1, f"max_seq_len {MAX_SEQ_LEN}"]),
    "not-a-list": ("abc", ["list"]),
}


@pytest.mark.parametrize("prompts, fragments", BAD_LOGITS.values(), ids=BAD_LOGITS.keys())
def test_logits_refuses_bad_request(model, prompts, fragments):
    with pytest.raises(RequestError) as info:
        model.logits(prompts)
    assert_message(info.value, *fragments)


def test_bad_requests_leave_the_model_usable(model):
    prompts = [[5, 6, 7], [8]]
    expected = model.generate(prompts, max_new_tokens=4, ignore_eos=True)
    for kwargs, _ in BAD_GENERATE.values():
        with pytest.raises(RequestError):
            model.generate(**kwargs)
    assert model.memory_stats()["kv_blocks_used"] == 0
    assert model.generate(prompts, max_new_tokens=4, ignore_eos=True) == expected
    assert len(model.generate([[1] * (MAX_SEQ_LEN - 2)], max_new_tokens=2, ignore_eos=True)[0]) == 2


def test_request_larger_than_kv_pool(artifact):
    small = xllm_compiler.load(artifact, kv_blocks=3)
    with pytest.raises(KVCacheExhaustedError) as info:
        small.generate([[1] * 40], max_new_tokens=10)
    assert_message(info.value, "KV blocks", "kv_blocks")
    assert small.memory_stats()["kv_blocks_used"] == 0
    assert len(small.generate([[1, 2]], max_new_tokens=2, ignore_eos=True)[0]) == 2


def test_text_needs_a_tokenizer(model):
    with pytest.raises(RequestError) as info:
        model.encode("hello")
    assert_message(info.value, "tokenizer.json")


# -- xllm-run -------------------------------------------------------------------------------------

BAD_RUN_ARGS = {
    "empty-prompt-ids": (["--prompt-ids", ""], ["empty"]),
    "prompt-ids-not-int": (["--prompt-ids", "1,x"], ["--prompt-ids", "1,x"]),
    "prompt-ids-float": (["--prompt-ids", "1.5"], ["--prompt-ids", "1.5"]),
    "id-equals-vocab": (["--prompt-ids", f"1,{VOCAB}"], [VOCAB, f"[0, {VOCAB})"]),
    "negative-id": (["--prompt-ids=-1"], ["-1"]),
    "second-prompt-bad": (["--prompt-ids", "1,2", "--prompt-ids", "300"], ["prompt 1", "300"]),
    "too-long": (
        ["--prompt-ids", ",".join(map(str, TOO_LONG)), "--max-new-tokens", "5"],
        [f"max_seq_len {MAX_SEQ_LEN}"],
    ),
    "negative-max-new-tokens": (["--prompt-ids", "1", "--max-new-tokens", "-1"], ["max_new_tokens", "-1"]),
    "max-new-tokens-not-int": (["--prompt-ids", "1", "--max-new-tokens", "x"], ["--max-new-tokens", "'x'"]),
    "negative-temperature": (["--prompt-ids", "1", "--temperature", "-1"], ["temperature", "-1"]),
    "temperature-not-float": (["--prompt-ids", "1", "--temperature", "hot"], ["--temperature", "hot"]),
    "top-p-zero": (["--prompt-ids", "1", "--top-p", "0"], ["top_p"]),
    "top-p-above-one": (["--prompt-ids", "1", "--top-p", "1.5"], ["top_p", "1.5"]),
    "prompt-without-tokenizer": (["--prompt", "hello"], ["tokenizer.json"]),
    "no-prompt": ([], ["--prompt", "--prompt-ids"]),
    "both-prompt-kinds": (["--prompt", "hi", "--prompt-ids", "1"], ["not allowed"]),
    "unknown-device": (["--prompt-ids", "1", "--device", "tpu"], ["tpu"]),
    "unknown-flag": (["--prompt-ids", "1", "--bogus"], ["--bogus"]),
}


@pytest.mark.parametrize("args, fragments", BAD_RUN_ARGS.values(), ids=BAD_RUN_ARGS.keys())
def test_xllm_run_refuses_bad_input(artifact, capsys, args, fragments):
    rc, stdout, err = call(run.main, [artifact, *args], capsys)
    assert rc == 2
    assert stdout == ""
    assert_one_line(err, "xllm-run", "error:", *fragments)


@pytest.mark.parametrize("which", ["missing", "checkpoint", "file"])
def test_xllm_run_refuses_a_non_artifact(llama_dir, tmp_path, capsys, which):
    target = {"missing": tmp_path / "nope", "checkpoint": llama_dir, "file": llama_dir / "config.json"}[which]
    rc, stdout, err = call(run.main, [target, "--prompt-ids", "1,2"], capsys)
    assert rc == 2
    assert stdout == ""
    assert_one_line(err, "xllm-run", "error:", target)


def test_xllm_run_usage_error_without_artifact(capsys):
    rc, _, err = call(run.main, [], capsys)
    assert rc == 2
    assert_one_line(err, "xllm-run", "error:", "--help")


def test_xllm_run_success_exits_zero(artifact, capsys):
    rc, stdout, err = call(
        run.main, [artifact, "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--ignore-eos"], capsys
    )
    assert rc == 0, err
    assert err == ""
    (line,) = stdout.splitlines()
    ids = [int(t) for t in line.split(",")]
    assert len(ids) == 3 and all(0 <= t < VOCAB for t in ids)


# -- compile: a pass that fails -------------------------------------------------------------------


def test_a_failing_pass_exits_1_with_one_line_naming_it(llama_dir, tmp_path, capsys, monkeypatch):
    """A bug in a pass is ours (exit 1), and the one line says which pass, at which version, raised what."""
    from xllm_compiler.passes import PassResult, graph_pass, manager

    @graph_pass("look_up_scales", version=3)
    def look_up_scales(gm):
        return PassResult(changed=bool({}["weight.x"]))

    from xllm_compiler import compiler

    pipeline = manager.default_pipeline
    for module in (manager, compiler):
        monkeypatch.setattr(module, "default_pipeline", lambda *args: [*pipeline(*args), look_up_scales])
    out = tmp_path / "out"
    rc, stdout, err = call(cli.main, [llama_dir, out, "--quiet", "--no-cache", *SMALL_ARGS], capsys)
    assert rc == 1
    assert stdout == ""
    assert_one_line(err, "xllm-compile", "internal error: pass look_up_scales v3 failed", "KeyError: 'weight.x'")
    assert_nothing_left(out)
