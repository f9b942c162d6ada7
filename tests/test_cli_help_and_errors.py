"""The command line's manners: OS errors of the user's making exit 2 naming the path, the tokenizer is
checked before anything is loaded, ``--help`` shows defaults and pass names, ``--version`` and
``python -m xllm_compiler`` work, and the compile summary says what a user needs at 80 columns.

These tests run as root, which no chmod stops; a read-only or full disk is simulated at the OS
boundary (os.access, tempfile.mkdtemp, the weights write), a file in place of a folder is real.
"""

from __future__ import annotations

import errno
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console
from safetensors import SafetensorError

import xllm_compiler
from tests.cli_calls import assert_one_line, call
from tests.hf_oracle import TINY
from xllm_compiler import __main__ as dispatcher
from xllm_compiler import cli, run
from xllm_compiler.artifact import writer
from xllm_compiler.compiler import resolve_max_seq_len
from xllm_compiler.errors import OutputDirError, RequestError
from xllm_compiler.models import load_spec
from xllm_compiler.options import MAX_SEQ_LEN_CAP, make_options
from xllm_compiler.oserrors import as_os_error, user_os_error
from xllm_compiler.passes import bucket_pipeline, default_pipeline
from xllm_compiler.tokenizer_check import check_tokenizer

MAX_SEQ_LEN = 64
SMALL = dict(decode_buckets=[1, 2], prefill_buckets=[16], max_seq_len=MAX_SEQ_LEN)
SMALL_ARGS = ["--decode-buckets", "1,2", "--prefill-buckets", "16", "--max-seq-len", str(MAX_SEQ_LEN)]
TOKENIZER = Path(__file__).resolve().parents[1] / "tools" / "tiny-llama" / "tokenizer.json"
TOKENIZER_IDS = 512  # tools/tiny-llama's tokenizer: ids 0..511


def one_line(err: str, prog: str, *fragments) -> str:
    """stderr is exactly one line starting with ``prog: error:`` and holding every fragment."""
    line = assert_one_line(err, prog, *fragments)
    assert line.startswith(f"{prog}: error: "), line
    return line


def nothing_beside(out: Path) -> None:
    """No OUT_DIR and no hidden staging folder beside it."""
    assert not out.exists()
    if out.parent.is_dir():
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


@pytest.fixture(scope="module")
def llama_dir(checkpoints) -> Path:
    return checkpoints.checkpoint("LlamaForCausalLM")[0]


@pytest.fixture(scope="module")
def artifact(checkpoints, llama_dir) -> Path:
    return checkpoints.artifact(llama_dir, **SMALL)


@pytest.fixture(scope="module")
def mismatched_artifact(llama_dir, tmp_path_factory) -> tuple[Path, dict]:
    """The tiny checkpoint (vocab 256) with tools/tiny-llama's tokenizer (512 ids) beside it: (artifact, report)."""
    model_dir = Path(shutil.copytree(llama_dir, tmp_path_factory.mktemp("mismatch") / "model"))
    shutil.copyfile(TOKENIZER, model_dir / "tokenizer.json")
    out = model_dir.parent / "artifact"
    return out, xllm_compiler.compile(model_dir, out, **SMALL)


# -- OS errors of the user's making ---------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2], ids=["parent-is-a-file", "grandparent-is-a-file"])
def test_out_dir_under_a_file_exits_2_naming_the_file(llama_dir, tmp_path, capsys, depth):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder\n")
    out = blocker / "sub" / "out" if depth == 2 else blocker / "out"
    with pytest.raises(OutputDirError) as info:
        xllm_compiler.compile(llama_dir, out, cache_dir="", **SMALL)
    assert str(blocker) in str(info.value) and "is a file" in str(info.value)
    rc, stdout, err = call(cli.main, [llama_dir, out, "--quiet", *SMALL_ARGS], capsys)
    assert (rc, stdout) == (2, "")
    one_line(err, "xllm-compile", out, blocker, "is a file, not a folder")
    assert blocker.read_text() == "a file, not a folder\n"


def test_read_only_parent_is_refused_before_any_work(llama_dir, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "read-only"
    parent.mkdir()
    out = parent / "out"
    access = writer.os.access
    monkeypatch.setattr(writer.os, "access", lambda path, mode: Path(path) != parent and access(path, mode))
    monkeypatch.setattr("xllm_compiler.compiler._build", lambda *a: pytest.fail("the compile ran"))
    rc, stdout, err = call(cli.main, [llama_dir, out, "--quiet", "--no-cache", *SMALL_ARGS], capsys)
    assert (rc, stdout) == (2, "")
    one_line(err, "xllm-compile", out, f"{parent} is not writable")
    nothing_beside(out)


def test_permission_denied_creating_the_staging_folder_exits_2(llama_dir, tmp_path, capsys, monkeypatch):
    """os.access can say yes where the write is still refused (ACLs, a race, root on NFS): the late error."""
    out = tmp_path / "out"
    mkdtemp = writer.tempfile.mkdtemp

    def refused(*args, dir=None, **kwargs):
        if Path(dir) == out.parent:
            raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / ".out.partial-x"))
        return mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(writer.tempfile, "mkdtemp", refused)
    with pytest.raises(OutputDirError) as info:
        xllm_compiler.compile(llama_dir, out, cache_dir="", **SMALL)
    assert isinstance(info.value.__cause__, PermissionError)
    rc, stdout, err = call(cli.main, [llama_dir, out, "--quiet", "--no-cache", *SMALL_ARGS], capsys)
    assert (rc, stdout) == (2, "")
    one_line(err, "xllm-compile", out, f"Permission denied in {out.parent}")
    nothing_beside(out)


NO_SPACE = {
    "oserror": lambda path: OSError(errno.ENOSPC, "No space left on device", str(path)),
    "safetensors": lambda path: SafetensorError(
        f'Error while serializing: I/O error: No space left on device (os error 28) at path "{path}"'
    ),
}


@pytest.mark.parametrize("make_error", NO_SPACE.values(), ids=NO_SPACE.keys())
def test_disk_full_while_writing_exits_2(llama_dir, tmp_path, capsys, monkeypatch, make_error):
    def full(root: Path, *args, **kwargs):
        raise make_error(root / "weights.safetensors")

    monkeypatch.setattr("xllm_compiler.compiler.write_weights", full)
    out = tmp_path / "out"
    rc, stdout, err = call(cli.main, [llama_dir, out, "--quiet", "--no-cache", *SMALL_ARGS], capsys)
    assert (rc, stdout) == (2, "")
    one_line(err, "xllm-compile", out, "No space left on device")
    nothing_beside(out)


def test_an_os_error_that_is_ours_stays_internal(llama_dir, tmp_path, capsys, monkeypatch):
    """A file we expected to exist and did not (ENOENT) is our bug: exit 1, not the user's exit 2."""

    def vanished(root: Path, *args, **kwargs):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(root / "graphs"))

    monkeypatch.setattr("xllm_compiler.compiler.write_manifest", vanished)
    out = tmp_path / "out"
    rc, _, err = call(cli.main, [llama_dir, out, "--quiet", "--no-cache", *SMALL_ARGS], capsys)
    assert rc == 1
    assert err.startswith("xllm-compile: internal error: FileNotFoundError") and len(err.splitlines()) == 1
    nothing_beside(out)


def test_unreadable_artifact_exits_2_naming_the_file(artifact, capsys, monkeypatch):
    manifest = artifact / "manifest.json"
    read_text = Path.read_text

    def denied(self, *args, **kwargs):
        if self == manifest:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    rc, stdout, err = call(run.main, [artifact, "--prompt-ids", "1,2"], capsys)
    assert (rc, stdout) == (2, "")
    one_line(err, "xllm-run", f"cannot access {manifest}: Permission denied")


@pytest.mark.parametrize(
    "exc, message",
    [
        (PermissionError(errno.EACCES, "Permission denied", "/x"), "cannot access /x: Permission denied"),
        (OSError(errno.EROFS, "Read-only file system", "/x"), "cannot access /x: Read-only file system"),
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x"), "cannot access /f/x: Not a directory"),
        (PermissionError(errno.EACCES, "Permission denied"), None),  # no path: whose folder?
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x"), None),
        (OSError("no errno"), None),
        (SafetensorError("Error while deserializing header: HeaderTooLarge"), None),
        (ValueError("not an OS error"), None),
    ],
)
def test_which_os_errors_are_the_users(exc, message):
    assert user_os_error(exc) == message


def test_safetensors_io_errors_become_os_errors():
    error = as_os_error(SafetensorError('I/O error: Permission denied (os error 13) at path "/ro/.tmp1"'))
    assert isinstance(error, OSError) and (error.errno, error.filename) == (errno.EACCES, "/ro/.tmp1")


def test_out_dir_hint_names_both_spellings_of_force(artifact, llama_dir):
    """The API's message names force=True, the CLI's user reads --force: one message serves both."""
    with pytest.raises(OutputDirError) as info:
        xllm_compiler.compile(llama_dir, artifact, cache_dir="", **SMALL)
    assert "force=True" in str(info.value) and "--force" in str(info.value)


# -- the tokenizer --------------------------------------------------------------------------------


def test_compile_report_says_there_is_no_tokenizer(artifact):
    report = json.loads((artifact / "report.json").read_text())
    assert report["tokenizer"]["status"] == "missing" and report["tokenizer"]["file"] is None


def test_compile_warns_of_a_tokenizer_that_does_not_fit(mismatched_artifact):
    _, report = mismatched_artifact
    tokenizer = report["tokenizer"]
    assert tokenizer["status"] == "mismatch"
    assert (tokenizer["vocab_size"], tokenizer["model_vocab_size"]) == (TOKENIZER_IDS, TINY["vocab_size"])
    assert f"its ids reach {TOKENIZER_IDS - 1}" in tokenizer["problem"]
    assert f"vocab_size {TINY['vocab_size']}" in tokenizer["problem"]


def test_compile_summary_shows_the_tokenizer_warning(mismatched_artifact):
    out, report = mismatched_artifact
    text = words(render(report, out))
    assert "warning" in text and "does not match the model" in text and "--prompt-ids" in text


def test_the_bundled_tokenizer_fits_its_model():
    check = check_tokenizer(TOKENIZER, TOKENIZER_IDS)
    assert check.ok and check.vocab_size == TOKENIZER_IDS and check.tokenizer is not None


@pytest.mark.parametrize(
    "model_vocab, status, fragment",
    [
        (TOKENIZER_IDS + 8, "ok", None),  # embedding padding (Qwen2.5 pads 271 rows of 151,936)
        (TOKENIZER_IDS - 1, "mismatch", "past the model's vocab_size"),
        (4 * TOKENIZER_IDS, "mismatch", "decode to nothing"),
    ],
    ids=["padded-embedding", "tokenizer-larger", "tokenizer-much-smaller"],
)
def test_tokenizer_vocabulary_must_cover_the_model(model_vocab, status, fragment):
    check = check_tokenizer(TOKENIZER, model_vocab)
    assert check.status == status
    assert (check.problem is None) if fragment is None else (fragment in check.problem)


def test_unreadable_tokenizer_is_reported_not_raised(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    check = check_tokenizer(tmp_path / "tokenizer.json", 256)
    assert check.status == "unreadable" and str(tmp_path / "tokenizer.json") in check.problem


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if xllm-run loads the artifact: tokenizer problems must be found before."""
    monkeypatch.setattr(xllm_compiler, "load", lambda *a, **k: pytest.fail("xllm-run loaded the weights"))


def test_run_text_prompt_without_tokenizer_exits_2_before_loading(artifact, capsys, no_load):
    rc, stdout, err = call(run.main, [artifact, "--prompt", "hello"], capsys)
    assert (rc, stdout) == (2, "")
    one_line(err, "xllm-run", artifact, "no tokenizer.json", "--prompt-ids")


def test_run_text_prompt_with_mismatched_tokenizer_exits_2_before_loading(mismatched_artifact, capsys, no_load):
    out, _ = mismatched_artifact
    rc, stdout, err = call(run.main, [out, "--prompt", "hello"], capsys)
    assert (rc, stdout) == (2, "")
    one_line(err, "xllm-run", "does not match the model", f"vocab_size {TINY['vocab_size']}", "--prompt-ids")


def test_run_token_ids_ignore_the_tokenizer(mismatched_artifact, capsys):
    out, _ = mismatched_artifact
    rc, stdout, err = call(run.main, [out, "--prompt-ids", "1,2", "--max-new-tokens", "2", "--ignore-eos"], capsys)
    assert rc == 0, err
    assert len(stdout.strip().split(",")) == 2


def test_manifest_tokenizer_reads_only_the_manifest(artifact, mismatched_artifact, tmp_path):
    assert run.manifest_tokenizer(artifact) == (None, TINY["vocab_size"])
    assert run.manifest_tokenizer(mismatched_artifact[0]) == ("tokenizer.json", TINY["vocab_size"])
    assert run.manifest_tokenizer(tmp_path) is None  # no manifest: load() will say so


# -- max_seq_len and its cap ----------------------------------------------------------------------


def test_default_max_seq_len_is_capped_and_says_so(llama_dir, tmp_path):
    model_dir = Path(shutil.copytree(llama_dir, tmp_path / "model"))
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = 4 * MAX_SEQ_LEN_CAP
    (model_dir / "config.json").write_text(json.dumps(config))
    spec = load_spec(model_dir)
    limits = resolve_max_seq_len(make_options(), spec)
    assert (limits.value, limits.capped, limits.chosen_by) == (MAX_SEQ_LEN_CAP, True, "default")
    chosen = resolve_max_seq_len(make_options(max_seq_len=2 * MAX_SEQ_LEN_CAP), spec)
    assert (chosen.value, chosen.capped, chosen.chosen_by) == (2 * MAX_SEQ_LEN_CAP, False, "option")
    text = cli._max_seq_len_text(limits.to_json())
    assert f"declares {4 * MAX_SEQ_LEN_CAP}" in text and f"capped at {MAX_SEQ_LEN_CAP}" in text
    assert "--max-seq-len" in text


def test_report_records_the_length_limits(artifact):
    limits = json.loads((artifact / "report.json").read_text())["limits"]
    assert limits == {
        "max_seq_len": MAX_SEQ_LEN,
        "max_position_embeddings": TINY["max_position_embeddings"],
        "max_seq_len_cap": MAX_SEQ_LEN_CAP,
        "capped": False,
        "chosen_by": "option",
    }


def test_too_long_request_says_how_to_compile_for_more(artifact):
    model = xllm_compiler.load(artifact)
    with pytest.raises(RequestError) as info:
        model.generate([[1] * (MAX_SEQ_LEN - 4)], max_new_tokens=10)
    assert f"max_seq_len {MAX_SEQ_LEN}" in str(info.value)
    assert f"--max-seq-len {MAX_SEQ_LEN + 6}" in str(info.value)


# -- the compile summary --------------------------------------------------------------------------


def render(report: dict, out: Path, width: int = 80) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(cli.summary(report, out))
    return console.export_text()


def words(text: str) -> str:
    """``text`` with its line breaks and padding gone: what a wrapped value says."""
    return " ".join(text.split())


def test_summary_fits_80_columns_without_breaking_values(artifact):
    report = json.loads((artifact / "report.json").read_text())
    text = render(report, artifact)
    lines = text.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80

    def fact(name: str) -> str:
        (line,) = [line for line in lines if line.startswith(f"{name}  ")]
        return words(line.removeprefix(name))

    assert fact("model").startswith(f"LlamaForCausalLM, {report['model']['parameters']:,} parameters, float32")
    assert (fact("decode buckets"), fact("prefill buckets")) == ("1,2", "16")
    assert fact("max_seq_len").startswith(f"{MAX_SEQ_LEN} (--max-seq-len")
    assert fact("artifact").endswith("on disk")
    assert fact("load memory").startswith("~") and "weights" in fact("load memory")


def test_summary_shows_the_load_memory_and_the_warnings_of_the_report(artifact):
    report = json.loads((artifact / "report.json").read_text())
    rows = dict((what, value.plain) for what, value in cli.summary_rows(report, artifact))
    memory = report["load_memory"]
    assert rows["load memory"].startswith("~") and f"{memory['kv_blocks']} blocks" in rows["load memory"]
    warned = {**report, "warnings": ["a load on this machine will fail: no room"]}
    assert ("warning", "warning: a load on this machine will fail: no room") in [
        (what, value.plain) for what, value in cli.summary_rows(warned, artifact)
    ]


# -- --help, --version, python -m xllm_compiler ---------------------------------------------------


def help_text(main: Callable, capsys, *argv: str) -> str:
    rc, out, _ = call(main, [*argv, "--help"], capsys)
    assert rc == 0
    return " ".join(out.split())  # argparse wraps at the terminal width


def test_compile_help_shows_defaults_and_pass_names(capsys):
    text = help_text(cli.main, capsys)
    for fragment in [
        "(default auto)",
        "(default 1,2,4,8)",
        "(default 32,64,128,256,512",
        f"max_position_embeddings, capped at {MAX_SEQ_LEN_CAP}",
        "tokens per KV-cache block (default 16; on npu 128",
        "(default 1)",
    ]:
        assert fragment in text, fragment
    for p in [*default_pipeline(), *bucket_pipeline()]:
        assert p.name in text, p.name


def test_run_help_shows_defaults(capsys):
    text = help_text(run.main, capsys)
    for fragment in ["per prompt (default 32)", "greedy (default 0.0)", "(default 1.0)", "the artifact's target"]:
        assert fragment in text, fragment


@pytest.mark.parametrize("main, prog", [(cli.main, "xllm-compile"), (run.main, "xllm-run")])
def test_version(capsys, main, prog):
    rc, out, err = call(main, ["--version"], capsys)
    assert (rc, err) == (0, "")
    assert out.startswith(f"{prog} {xllm_compiler.__version__} (torch 2.")


def test_python_dash_m_dispatches_to_each_tool(capsys, artifact):
    listed = help_text(dispatcher.main, capsys)
    assert all(f"{command} " in listed for command in ("compile", "run", "serve", "cache"))
    assert help_text(dispatcher.main, capsys, "compile") == help_text(cli.main, capsys)
    assert help_text(dispatcher.main, capsys, "run") == help_text(run.main, capsys)
    rc, out, _ = call(dispatcher.main, ["run", artifact, "--prompt-ids", "1,2", "--max-new-tokens", "1"], capsys)
    assert rc == 0 and out.strip().isdigit()
    rc, _, err = call(dispatcher.main, ["bogus"], capsys)
    assert rc == 2 and "bogus" in err and len(err.splitlines()) == 1
    rc, _, err = call(dispatcher.main, [], capsys)
    assert rc == 2 and len(err.splitlines()) == 1


def test_python_dash_m_xllm_compiler_in_a_process():
    proc = subprocess.run(
        [sys.executable, "-m", "xllm_compiler", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "compile" in proc.stdout and "run" in proc.stdout


def test_run_help_imports_neither_passes_nor_models():
    """An artifact runs without the code that compiled it: even xllm-run's parser must not need it."""
    code = (
        "import sys\n"
        "from xllm_compiler.run import build_parser\n"
        "build_parser().format_help()\n"
        "print(sorted(m for m in sys.modules if m.startswith(('xllm_compiler.passes', 'xllm_compiler.models'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
