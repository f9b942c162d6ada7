"""The compile cache: a second identical compile reuses the first; anything the artifact depends on (options,
checkpoint bytes, pass versions, torch version) changes the key; a damaged entry is never used, but rebuilt;
and the cache can be turned off (cache_dir="", --no-cache) or bypassed (verify, debug_dump).

Every test uses a cache folder of its own (``cache_dir=tmp_path / "cache"``) and a tiny one-layer checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import xllm_compiler
import xllm_compiler.compiler as compiler
from tests.hf_oracle import make_hf_model
from xllm_compiler.artifact.manifest import read_manifest
from xllm_compiler.cache import ENTRY_INDEX, STAT_INDEX
from xllm_compiler.cli import main as compile_main
from xllm_compiler.errors import ArtifactError
from xllm_compiler.passes.fusion.fuse_rms_norm import fuse_rms_norm

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
        manifest = read_manifest(tmp_path / name)
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
    assert read_manifest(tmp_path / "b")["source"]["path"] == str(checkpoint.absolute())


def test_artifacts_from_one_entry_share_files_and_damage_is_caught(base_checkpoint, cache, tmp_path):
    """Hits hard-link the entry (like uv's cache): no second copy of the weights. The price, documented
    in xllm_compiler/cache.py: an artifact edited in place damages its siblings and the entry. Both are
    caught by hash: load() refuses the sibling, and the next compile misses and rebuilds the entry."""
    compile_(base_checkpoint, tmp_path / "a", cache)
    assert_hit(compile_(base_checkpoint, tmp_path / "b", cache))
    reference = logits(tmp_path / "b")
    weights = tmp_path / "a" / WEIGHTS
    assert weights.stat().st_ino == (tmp_path / "b" / WEIGHTS).stat().st_ino
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    with open(weights, "r+b") as f:  # damage artifact a in place (same inode)
        f.write(bytes(data))
    with pytest.raises(ArtifactError, match=WEIGHTS):
        xllm_compiler.load(tmp_path / "b")
    rebuilt = compile_(base_checkpoint, tmp_path / "c", cache)
    assert_miss(rebuilt)
    assert torch.equal(logits(tmp_path / "c"), reference)


# -- misses ----------------------------------------------------------------------------------------------------


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
    assert read_manifest(tmp_path / "b")["cache_key"] == changed["cache"]["key"]
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


@pytest.mark.parametrize(
    "how",
    [
        "weights byte",
        "graph byte",
        "deleted graph",
        "deleted weights",
        "truncated weights",
        "extra file",
        "bad index",
        "deleted index",
        "index of another key",
    ],
)
def test_a_damaged_entry_is_detected_and_rebuilt(base_checkpoint, cache, tmp_path, how):
    first = compile_(base_checkpoint, tmp_path / "a", cache)
    key = first["cache"]["key"]
    reference = logits(tmp_path / "a")  # before the damage: the entry may share its files with artifact a
    (entry,) = entries(cache)
    damage(entry, how)

    rebuilt = compile_(base_checkpoint, tmp_path / "b", cache)
    assert_miss(rebuilt)
    assert rebuilt["cache"]["key"] == key
    assert torch.equal(logits(tmp_path / "b"), reference)
    assert [e.name for e in entries(cache)] == [key]
    assert_entry_intact(entries(cache)[0], key)
    assert "extra.json" not in {p.name for p in entries(cache)[0].rglob("*")}

    again = compile_(base_checkpoint, tmp_path / "c", cache)
    assert_hit(again)
    assert torch.equal(logits(tmp_path / "c"), reference)


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
