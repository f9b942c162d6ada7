"""The compile cache: a second identical compile reuses the first; anything the artifact depends on (options,
checkpoint bytes, pass versions, torch version) changes the key; artifacts never share files with it; a damaged
entry is never used, but rebuilt and reported; it stays within its size limit by evicting the least recently used
entries; two compiles of one key build once; ``xllm-cache`` lists and clears it; and it can be turned off
(cache_dir="", --no-cache) or bypassed (verify, debug_dump).

Every test uses a cache folder of its own (``cache_dir=tmp_path / "cache"``) and a tiny one-layer checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import xllm_compiler
import xllm_compiler.compiler as compiler
from tests.hf_oracle import make_hf_model
from xllm_compiler.cache import ENTRY_INDEX, MAX_SIZE_ENV, STAT_INDEX, CompileCache
from xllm_compiler.cache_cli import main as cache_main
from xllm_compiler.cli import main as compile_main
from xllm_compiler.errors import ArtifactError, OptionsError
from xllm_compiler.options import make_options
from xllm_compiler.passes.fusion.fuse_rms_norm import fuse_rms_norm
from xllm_compiler.sizes import parse_size

OPTIONS = dict(decode_buckets=[1], prefill_buckets=[8], max_seq_len=32)
PROMPTS = [[1, 2, 3, 4, 5], [7]]
WEIGHTS = "weights.safetensors"
METADATA = {"report.json", "manifest.json"}
BUILD_STAGES = {"weights", "capture", "passes", "buckets", "write"}
MISS_STAGES = {"capture", "passes", "write"}  # a build ran (stage names of the hit path never include these)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _default_size_limit(monkeypatch):
    monkeypatch.delenv(MAX_SIZE_ENV, raising=False)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache-ckpt") / "checkpoint"
    model = make_hf_model("LlamaForCausalLM", num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    model.save_pretrained(path)
    return path


@pytest.fixture
def checkpoint(base_checkpoint, tmp_path) -> Path:
    """A copy of the tiny checkpoint this test may change."""
    path = tmp_path / "checkpoint"
    shutil.copytree(base_checkpoint, path)
    return path


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def compile_(model_dir: Path, out: Path, cache: Path | str, **overrides) -> dict:
    return xllm_compiler.compile(model_dir, out, cache_dir=str(cache), **{**OPTIONS, **overrides})


def stage_names(report: dict) -> set[str]:
    return {stage["name"] for stage in report["stages"]}


def assert_hit(report: dict) -> None:
    assert report["cache"]["hit"] is True
    assert {"config", "cache"} <= stage_names(report)
    assert not stage_names(report) & BUILD_STAGES, report["stages"]


def assert_miss(report: dict) -> None:
    assert report["cache"]["hit"] is False
    assert stage_names(report) >= MISS_STAGES, report["stages"]


def manifest_json(artifact: Path) -> dict:
    return json.loads((artifact / "manifest.json").read_text())


def logits(artifact: Path) -> torch.Tensor:
    return xllm_compiler.load(artifact).logits(PROMPTS)


def artifact_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def entries(cache: Path) -> list[Path]:
    folder = cache / "entries"
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


def assert_entry_intact(entry: Path, key: str) -> None:
    index = json.loads((entry / ENTRY_INDEX).read_text())
    assert index["key"] == key == entry.name
    on_disk = sorted(str(p.relative_to(entry)) for p in entry.rglob("*") if p.is_file() and p.name != ENTRY_INDEX)
    assert sorted(index["files"]) == on_disk
    for rel, record in index["files"].items():
        digest = record["sha256"]
        assert (entry / rel).stat().st_size == record["bytes"], rel
        assert hashlib.sha256((entry / rel).read_bytes()).hexdigest() == digest, rel


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()
    }


# -- hits ----------------------------------------------------------------------------------------------------------


def test_second_identical_compile_is_a_hit_with_the_same_artifact(base_checkpoint, cache, tmp_path):
    first = compile_(base_checkpoint, tmp_path / "a", cache)
    second = compile_(base_checkpoint, tmp_path / "b", cache)
    assert_miss(first)
    assert_hit(second)
    key = first["cache"]["key"]
    assert second["cache"]["key"] == key
    assert [e.name for e in entries(cache)] == [key]
    assert_entry_intact(entries(cache)[0], key)

    for name, report in (("a", first), ("b", second)):
        manifest = manifest_json(tmp_path / name)
        assert manifest["cache_key"] == report["cache"]["key"]
        assert json.loads((tmp_path / name / "report.json").read_text()) == report
    # The reused report describes the cached compile (model, graph, passes, buckets), not an empty one.
    for section in ("model", "graph", "passes", "buckets", "torch_version", "xllm_compiler_version"):
        assert second[section] == first[section], section

    a, b = artifact_files(tmp_path / "a"), artifact_files(tmp_path / "b")
    assert set(a) == set(b)
    assert {rel for rel in a if a[rel] != b[rel]} <= METADATA
    assert WEIGHTS in a and any(rel.startswith("graphs/") for rel in a)
    assert torch.equal(logits(tmp_path / "a"), logits(tmp_path / "b"))


def test_hit_survives_the_cache_being_deleted_and_replaces_with_force(base_checkpoint, cache, tmp_path):
    compile_(base_checkpoint, tmp_path / "a", cache)
    assert_hit(compile_(base_checkpoint, tmp_path / "a", cache, force=True))
    reference = logits(tmp_path / "a")
    assert_entry_intact(entries(cache)[0], entries(cache)[0].name)
    shutil.rmtree(cache)
    assert torch.equal(logits(tmp_path / "a"), reference)


def test_a_copy_of_the_checkpoint_elsewhere_hits_and_records_its_own_path(base_checkpoint, checkpoint, cache, tmp_path):
    compile_(base_checkpoint, tmp_path / "a", cache)
    report = compile_(checkpoint, tmp_path / "b", cache)
    assert_hit(report)
    assert manifest_json(tmp_path / "b")["source"]["path"] == str(checkpoint.absolute())


def test_artifacts_never_share_files_with_the_cache(base_checkpoint, cache, tmp_path):
    """Store and restore copy (a reflink where the file system can): an artifact edited in place changes
    neither the entry nor the artifacts restored from it."""
    compile_(base_checkpoint, tmp_path / "a", cache)
    assert_hit(compile_(base_checkpoint, tmp_path / "b", cache))
    reference = logits(tmp_path / "b")
    folders = [tmp_path / "a", tmp_path / "b", entries(cache)[0]]
    files = [p for folder in folders for p in folder.rglob("*") if p.is_file()]
    assert all(p.stat().st_nlink == 1 for p in files)
    assert len({p.stat().st_ino for p in files}) == len(files)

    weights = tmp_path / "a" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    with open(weights, "r+b") as f:  # damage artifact a in place
        f.write(bytes(data))
    with pytest.raises(ArtifactError, match=WEIGHTS):
        xllm_compiler.load(tmp_path / "a")
    assert torch.equal(logits(tmp_path / "b"), reference)
    assert_entry_intact(entries(cache)[0], entries(cache)[0].name)
    assert_hit(compile_(base_checkpoint, tmp_path / "c", cache))


# -- misses ----------------------------------------------------------------------------------------------------


def test_an_edit_to_the_compilers_code_misses(base_checkpoint, cache, tmp_path, monkeypatch):
    """A source edit that moves no pass, format or lowering version (a model builder's, say) still misses:
    the key holds a sha256 of the compiler's Python sources."""
    from xllm_compiler import compiler

    first = compile_(base_checkpoint, tmp_path / "a", cache)
    monkeypatch.setattr(compiler, "code_sha256", lambda: "0" * 64)
    edited = compile_(base_checkpoint, tmp_path / "b", cache)
    assert_miss(edited)
    assert edited["cache"]["key"] != first["cache"]["key"]


@pytest.mark.parametrize(
    "change",
    [
        dict(dtype="bfloat16"),
        dict(max_seq_len=48),
        dict(block_size=8),
        dict(decode_buckets=[1, 2]),
        dict(prefill_buckets=[16]),
        dict(passes="none"),
        dict(disable_passes=("fuse_rms_norm",)),
    ],
    ids=lambda change: next(iter(change)),
)
def test_a_changed_option_misses(base_checkpoint, cache, tmp_path, change):
    first = compile_(base_checkpoint, tmp_path / "a", cache)
    changed = compile_(base_checkpoint, tmp_path / "b", cache, **change)
    assert_miss(changed)
    assert changed["cache"]["key"] != first["cache"]["key"]
    assert manifest_json(tmp_path / "b")["cache_key"] == changed["cache"]["key"]
    assert len(entries(cache)) == 2
    # ... and the changed compile is itself cached.
    assert_hit(compile_(base_checkpoint, tmp_path / "c", cache, **change))


def test_options_that_do_not_change_the_artifact_share_the_entry(base_checkpoint, cache, tmp_path):
    """dtype 'auto' on a float32 checkpoint is float32; 'cpu' is what 'auto' picks here; the bucket list is
    normalised (sorted, unique) before it is keyed."""
    first = compile_(base_checkpoint, tmp_path / "a", cache)
    assert_hit(compile_(base_checkpoint, tmp_path / "b", cache, dtype="float32", device="cpu"))
    assert_hit(compile_(base_checkpoint, tmp_path / "c", cache, decode_buckets=[1, 1]))
    assert [e.name for e in entries(cache)] == [first["cache"]["key"]]


def test_a_changed_config_misses(checkpoint, cache, tmp_path):
    first = compile_(checkpoint, tmp_path / "a", cache)
    config = json.loads((checkpoint / "config.json").read_text())
    config["rms_norm_eps"] = config["rms_norm_eps"] * 10
    (checkpoint / "config.json").write_text(json.dumps(config))
    changed = compile_(checkpoint, tmp_path / "b", cache)
    assert_miss(changed)
    assert changed["cache"]["key"] != first["cache"]["key"]


def change_one_weight(checkpoint: Path) -> None:
    """Rewrite model.safetensors with one element of one tensor changed (the file keeps its size)."""
    path = checkpoint / "model.safetensors"
    size = path.stat().st_size
    tensors = load_file(str(path))
    name = next(n for n in sorted(tensors) if n.endswith("down_proj.weight"))
    tensors[name][0, 0] += 1.0
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert path.stat().st_size == size


def test_a_changed_weight_misses(checkpoint, cache, tmp_path):
    first = compile_(checkpoint, tmp_path / "a", cache)
    before = logits(tmp_path / "a")
    change_one_weight(checkpoint)
    changed = compile_(checkpoint, tmp_path / "b", cache)
    assert_miss(changed)
    assert changed["cache"]["key"] != first["cache"]["key"]
    assert not torch.equal(logits(tmp_path / "b"), before)


def test_stat_cached_checkpoint_hash_is_invalidated_by_a_same_size_edit(checkpoint, cache, tmp_path):
    """file-hashes.json remembers each checkpoint file's sha256 by (size, mtime): a file rewritten with the
    same size but other bytes (and so a new mtime) is hashed again."""
    first = compile_(checkpoint, tmp_path / "a", cache)
    index = json.loads((cache / STAT_INDEX).read_text())
    weights = str((checkpoint / "model.safetensors").resolve())
    assert weights in index
    old = index[weights]

    path = checkpoint / "model.safetensors"
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor's data: a valid file, one value changed
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert path.stat().st_size == stat.st_size

    changed = compile_(checkpoint, tmp_path / "b", cache)
    assert_miss(changed)
    assert changed["cache"]["key"] != first["cache"]["key"]
    new = json.loads((cache / STAT_INDEX).read_text())[weights]
    assert new["sha256"] != old["sha256"]
    assert new["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert new["stat"] == [path.stat().st_size, path.stat().st_mtime_ns]


def test_a_changed_pass_version_misses(base_checkpoint, cache, tmp_path, monkeypatch):
    first = compile_(base_checkpoint, tmp_path / "a", cache)
    monkeypatch.setattr(fuse_rms_norm, "version", 99)
    changed = compile_(base_checkpoint, tmp_path / "b", cache)
    assert_miss(changed)
    assert changed["cache"]["key"] != first["cache"]["key"]
    assert {p["name"]: p["version"] for p in changed["passes"]}["fuse_rms_norm"] == 99


class _TorchWithVersion(types.ModuleType):
    """torch as compiler.py sees it, but reporting another version (nothing else is patched)."""

    def __init__(self, version: str):
        super().__init__("torch")
        self.__version__ = version

    def __getattr__(self, name):
        return getattr(torch, name)


def test_a_different_torch_version_misses(base_checkpoint, cache, tmp_path, monkeypatch):
    first = compile_(base_checkpoint, tmp_path / "a", cache)
    monkeypatch.setattr(compiler, "torch", _TorchWithVersion(f"{torch.__version__}.other"))
    changed = compile_(base_checkpoint, tmp_path / "b", cache)
    assert_miss(changed)
    assert changed["cache"]["key"] != first["cache"]["key"]
    assert changed["torch_version"] == f"{torch.__version__}.other"


# -- no cache, bypasses ------------------------------------------------------------------------------------------


def test_empty_cache_dir_never_reads_or_writes_the_cache(base_checkpoint, tmp_path, monkeypatch):
    default = tmp_path / "default-cache"
    monkeypatch.setenv("XLLM_CACHE_DIR", str(default))
    # cache_dir=None is the default folder: fill it.
    filled = xllm_compiler.compile(base_checkpoint, tmp_path / "a", **OPTIONS)
    assert [e.name for e in entries(default)] == [filled["cache"]["key"]]
    before = snapshot(default)

    report = compile_(base_checkpoint, tmp_path / "b", "")
    assert_miss(report)  # an entry for this very key exists, but is not read
    assert snapshot(default) == before
    assert torch.equal(logits(tmp_path / "b"), logits(tmp_path / "a"))

    monkeypatch.setenv("XLLM_CACHE_DIR", str(tmp_path / "never"))
    assert_miss(compile_(base_checkpoint, tmp_path / "c", ""))
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("bypass", ["verify", "debug_dump"])
def test_verify_and_debug_dump_always_build(base_checkpoint, cache, tmp_path, bypass):
    first = compile_(base_checkpoint, tmp_path / "a", cache)
    value = True if bypass == "verify" else str(tmp_path / "dump")
    report = compile_(base_checkpoint, tmp_path / "b", cache, **{bypass: value})
    assert_miss(report)
    assert report["cache"]["key"] == first["cache"]["key"]
    assert torch.equal(logits(tmp_path / "b"), logits(tmp_path / "a"))
    if bypass == "debug_dump":
        assert any((tmp_path / "dump").iterdir())
    # The entry is still there, intact, for the next ordinary compile.
    assert_hit(compile_(base_checkpoint, tmp_path / "c", cache))


# -- damaged entries ---------------------------------------------------------------------------------------------


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def damage(entry: Path, how: str) -> None:
    if how == "weights byte":
        flip_byte(entry / WEIGHTS)
    elif how == "graph byte":
        flip_byte(entry / "graphs" / "decode_1.json")
    elif how == "deleted graph":
        (entry / "graphs" / "prefill_8.json").unlink()
    elif how == "deleted weights":
        (entry / WEIGHTS).unlink()
    elif how == "truncated weights":
        (entry / WEIGHTS).write_bytes((entry / WEIGHTS).read_bytes()[:100])
    elif how == "extra file":
        (entry / "graphs" / "extra.json").write_text("{}")
    elif how == "bad index":
        (entry / ENTRY_INDEX).write_text("{not json")
    elif how == "deleted index":
        (entry / ENTRY_INDEX).unlink()
    elif how == "index of another key":
        index = json.loads((entry / ENTRY_INDEX).read_text())
        (entry / ENTRY_INDEX).write_text(json.dumps({**index, "key": "0" * 64}))
    else:
        raise AssertionError(how)


DAMAGE = {
    "weights byte": f"{WEIGHTS}: sha256 mismatch",
    "graph byte": "graphs/decode_1.json: sha256 mismatch",
    "deleted graph": "graphs/prefill_8.json is missing",
    "deleted weights": f"{WEIGHTS} is missing",
    "truncated weights": f"{WEIGHTS} has 100 bytes",
    "extra file": "graphs/extra.json is not listed in entry.json",
    "bad index": "entry.json is unreadable",
    "deleted index": "entry.json is missing",
    "index of another key": "entry.json names another key",
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_entry_is_detected_reported_and_rebuilt(base_checkpoint, cache, tmp_path, how):
    """The artifacts made before the damage (the one that filled the entry, and one restored from it) still
    load; the next compile says what was wrong with the entry and rebuilds it."""
    first = compile_(base_checkpoint, tmp_path / "a", cache)
    key = first["cache"]["key"]
    assert "damaged" not in first["cache"]
    assert_hit(compile_(base_checkpoint, tmp_path / "b", cache))
    reference = logits(tmp_path / "a")
    (entry,) = entries(cache)
    damage(entry, how)
    for earlier in ("a", "b"):
        assert torch.equal(logits(tmp_path / earlier), reference), earlier

    rebuilt = compile_(base_checkpoint, tmp_path / "c", cache)
    assert_miss(rebuilt)
    assert DAMAGE[how] in rebuilt["cache"]["damaged"]
    assert rebuilt["cache"]["key"] == key
    assert json.loads((tmp_path / "c" / "report.json").read_text())["cache"] == rebuilt["cache"]
    assert torch.equal(logits(tmp_path / "c"), reference)
    assert [e.name for e in entries(cache)] == [key]
    assert_entry_intact(entries(cache)[0], key)
    assert "extra.json" not in {p.name for p in entries(cache)[0].rglob("*")}

    again = compile_(base_checkpoint, tmp_path / "d", cache)
    assert_hit(again)
    assert "damaged" not in again["cache"]
    assert torch.equal(logits(tmp_path / "d"), reference)


# -- size limit and eviction ------------------------------------------------------------------------------------


def sizes(cache: Path) -> dict[str, int]:
    """Entry sizes by key, most recently used first."""
    return {e.key: e.bytes for e in CompileCache(cache).entries()}


def test_the_cache_evicts_least_recently_used_entries_down_to_its_limit(base_checkpoint, cache, tmp_path, monkeypatch):
    """A hit counts as a use: the entry stored first but hit since survives; the one stored later and never
    used again is evicted. Artifacts made from an evicted entry are untouched."""
    first = compile_(base_checkpoint, tmp_path / "first", cache, block_size=8)["cache"]["key"]
    second = compile_(base_checkpoint, tmp_path / "second", cache)["cache"]["key"]
    assert list(sizes(cache)) == [second, first]
    assert_hit(compile_(base_checkpoint, tmp_path / "first-again", cache, block_size=8))
    assert list(sizes(cache)) == [first, second]

    largest = max(sizes(cache).values())
    limit = int(2.5 * largest)  # room for two entries, not three
    assert 3 * min(sizes(cache).values()) > limit
    monkeypatch.setenv(MAX_SIZE_ENV, str(limit))
    third = compile_(base_checkpoint, tmp_path / "third", cache, block_size=32)["cache"]["key"]
    assert list(sizes(cache)) == [third, first]
    assert sum(sizes(cache).values()) <= limit
    assert_entry_intact(cache / "entries" / first, first)
    assert torch.equal(logits(tmp_path / "second"), logits(tmp_path / "first"))

    # xllm-cache prune trims to a limit given on its command line, oldest first.
    code = cache_main(["--cache-dir", str(cache), "--max-size", str(sizes(cache)[third]), "prune"])
    assert code == 0
    assert list(sizes(cache)) == [third]


def test_an_artifact_larger_than_the_whole_limit_is_not_cached(base_checkpoint, cache, tmp_path, monkeypatch):
    compile_(base_checkpoint, tmp_path / "a", cache)
    monkeypatch.setenv(MAX_SIZE_ENV, "1K")
    with pytest.warns(UserWarning, match="alone exceed the compile cache's limit of 1.0 KiB"):
        report = compile_(base_checkpoint, tmp_path / "b", cache, block_size=8)
    assert_miss(report)
    assert entries(cache) == []  # nor does the cache keep more than its (now smaller) limit
    assert torch.equal(logits(tmp_path / "a"), logits(tmp_path / "b"))


@pytest.mark.parametrize(
    ("text", "size"),
    [("10G", 10 * 2**30), ("500M", 500 * 2**20), ("1.5GiB", 3 * 2**29), ("64kb", 64 * 2**10), ("12345", 12345)],
)
def test_sizes_parse_in_powers_of_1024(text, size):
    assert parse_size(text, MAX_SIZE_ENV) == size


@pytest.mark.parametrize("text", ["", "abc", "0", "-1G", "10X", "1e9", "G"])
def test_a_bad_size_is_a_one_line_error_naming_the_variable(text):
    with pytest.raises(OptionsError, match=f"^{MAX_SIZE_ENV}=") as error:
        parse_size(text, MAX_SIZE_ENV)
    assert "\n" not in str(error.value)


def test_a_bad_size_limit_in_the_environment_fails_a_compile_with_one_line(
    base_checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv(MAX_SIZE_ENV, "lots")
    code = compile_main([str(base_checkpoint), str(tmp_path / "a"), "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{MAX_SIZE_ENV}='lots' is not a size" in err, err
    assert not (tmp_path / "a").exists()


# -- one build per key -------------------------------------------------------------------------------------------


class _HoldTheLock:
    """A stage listener: the compile that got the key's lock does not start building until the other compile
    is waiting for that lock, so that the two surely overlap (no sleeps, no timing)."""

    def __init__(self, other_waiting: threading.Event):
        self.other_waiting = other_waiting

    def stage_started(self, name: str, description: str) -> None:
        if name == "lock":
            self.other_waiting.set()
        elif name == "weights":
            assert self.other_waiting.wait(timeout=60), "the second compile never waited for the lock"

    def stage_finished(self, name: str, seconds: float) -> None:
        pass


def test_two_concurrent_compiles_of_one_key_build_once(base_checkpoint, cache, tmp_path):
    waiting = threading.Event()
    reports: dict[str, dict] = {}
    failures: list[BaseException] = []

    def run(name: str) -> None:
        try:
            options = make_options(cache_dir=str(cache), **OPTIONS)
            reports[name] = compiler.compile_model(base_checkpoint, tmp_path / name, options, _HoldTheLock(waiting))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures, failures
    built, hit = sorted(reports.values(), key=lambda report: report["cache"]["hit"])
    assert_miss(built)
    assert_hit(hit)
    assert "lock" in stage_names(hit)
    assert [e.name for e in entries(cache)] == [built["cache"]["key"]]
    assert torch.equal(logits(tmp_path / "a"), logits(tmp_path / "b"))


def test_the_lock_is_a_file_under_locks_and_is_free_again_after_the_body(tmp_path):
    """(A disabled cache takes none: test_empty_cache_dir_never_reads_or_writes_the_cache.)"""
    cache = CompileCache(tmp_path / "cache")
    key = "1" * 64
    with cache.locked(key):
        assert cache.lock_path(key) == tmp_path / "cache" / "locks" / f"{key}.lock"
    with cache.locked(key, waiting=lambda lock: pytest.fail(f"{lock} is still held")):
        pass


# -- the command line ------------------------------------------------------------------------------------------

CLI_OPTIONS = ["--decode-buckets", "1", "--prefill-buckets", "8", "--max-seq-len", "32"]


def cli_report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_cli_cache_dir(base_checkpoint, cache, tmp_path, capsys):
    for name in ("a", "b"):
        code = compile_main([str(base_checkpoint), str(tmp_path / name), "--cache-dir", str(cache), *CLI_OPTIONS])
        assert code == 0
    assert cli_report(tmp_path / "a")["cache"]["hit"] is False
    assert_hit(cli_report(tmp_path / "b"))
    assert [e.name for e in entries(cache)] == [cli_report(tmp_path / "a")["cache"]["key"]]
    out = " ".join(capsys.readouterr().out.split())
    assert "from the compile cache" in out
    assert "damaged" not in out

    flip_byte(entries(cache)[0] / WEIGHTS)
    code = compile_main([str(base_checkpoint), str(tmp_path / "c"), "--cache-dir", str(cache), *CLI_OPTIONS])
    assert code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"entry was damaged ({WEIGHTS}: sha256 mismatch): discarded and rebuilt" in out


def test_cli_no_cache(base_checkpoint, tmp_path, monkeypatch):
    default = tmp_path / "default-cache"
    monkeypatch.setenv("XLLM_CACHE_DIR", str(default))
    explicit = tmp_path / "explicit-cache"
    for name, extra in (("a", []), ("b", []), ("c", ["--cache-dir", str(explicit)])):
        code = compile_main([str(base_checkpoint), str(tmp_path / name), "--no-cache", "--quiet", *CLI_OPTIONS, *extra])
        assert code == 0
        assert_miss(cli_report(tmp_path / name))
    assert not default.exists()
    assert not explicit.exists()
    # Without --no-cache the environment's folder is the cache.
    for name in ("d", "e"):
        assert compile_main([str(base_checkpoint), str(tmp_path / name), "--quiet", *CLI_OPTIONS]) == 0
    assert_hit(cli_report(tmp_path / "e"))
    assert len(entries(default)) == 1


# -- xllm-cache ------------------------------------------------------------------------------------------------


def test_xllm_cache_info_and_clear(base_checkpoint, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "400")  # one table row per line
    keep = compile_(base_checkpoint, tmp_path / "a", cache)["cache"]["key"]
    drop = compile_(base_checkpoint, tmp_path / "b", cache, block_size=8)["cache"]["key"]
    capsys.readouterr()

    assert cache_main(["--cache-dir", str(cache), "info"]) == 0
    out = capsys.readouterr().out
    assert f"compile cache {cache}" in out
    assert "2 entries" in out and "of a 20.0 GiB limit" in out
    for key in (keep, drop):
        (row,) = [line for line in out.splitlines() if key[:12] in line]
        assert (
            str(base_checkpoint.absolute()) in row and "LlamaForCausalLM" in row and "float32" in row and "KiB" in row
        )

    assert cache_main(["--cache-dir", str(cache), "clear", "--key", drop[:6]]) == 0
    assert "removed 1 entry" in capsys.readouterr().out
    assert [e.name for e in entries(cache)] == [keep]
    assert cache_main(["--cache-dir", str(cache), "clear", "--key", "xyz"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no entry of the compile cache" in err and "'xyz'" in err

    partial = cache / "entries" / f".{keep[:12]}-killed"  # the staging folder of a compile killed mid-store
    partial.mkdir()
    (partial / WEIGHTS).write_bytes(b"half")
    assert cache_main(["--cache-dir", str(cache), "clear"]) == 0
    assert entries(cache) == [] and not (cache / STAT_INDEX).exists()
    assert not any((cache / "entries").iterdir())
    assert torch.equal(logits(tmp_path / "a"), logits(tmp_path / "b"))  # artifacts do not depend on the cache
    assert cache_main(["--cache-dir", str(cache), "info"]) == 0
    assert "0 entries" in capsys.readouterr().out


def test_xllm_cache_uses_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XLLM_CACHE_DIR", str(tmp_path / "from-env"))
    monkeypatch.setenv(MAX_SIZE_ENV, "500M")
    monkeypatch.setenv("COLUMNS", "400")
    assert cache_main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"compile cache {tmp_path / 'from-env'}" in out and "of a 500.0 MiB limit" in out
    assert not (tmp_path / "from-env").exists()  # looking creates nothing
    assert cache_main(["--max-size", "big", "info"]) == 2
    assert capsys.readouterr().err.count("\n") == 1

    monkeypatch.delenv("XLLM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_main(["info"]) == 0
    assert f"compile cache {tmp_path / 'xdg' / 'xllm_compiler'}" in capsys.readouterr().out


def test_cache_max_size_is_a_compile_option(checkpoint, cache, tmp_path, capsys):
    sizes = ["--decode-buckets", "1", "--prefill-buckets", "8", "--max-seq-len", "32"]
    args = [str(checkpoint), str(tmp_path / "out"), "--cache-dir", str(cache), "--quiet", *sizes]
    with pytest.warns(UserWarning, match="not caching"):
        assert compile_main([*args, "--cache-max-size", "1K"]) == 0  # the artifact alone exceeds the limit
    assert not any((cache / "entries").glob("[0-9a-f]*"))
    assert compile_main([*args, "--force", "--cache-max-size", "lots"]) == 2
    assert "--cache-max-size='lots' is not a size" in capsys.readouterr().err
