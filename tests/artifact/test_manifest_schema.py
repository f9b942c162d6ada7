"""The typed manifest: the compiler writes it, the runtime reads it, and a bad field fails in load() by name."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import xllm_compiler
from xllm_compiler.artifact.manifest import read_manifest
from xllm_compiler.artifact.schema import FORMAT_VERSION, MANIFEST, Manifest
from xllm_compiler.errors import ArtifactError

REPO = Path(__file__).resolve().parents[2]
OPTIONS = dict(decode_buckets=[1, 2], prefill_buckets=[16], max_seq_len=64, cache_dir="")


@pytest.fixture(scope="module")
def pristine(checkpoints) -> Path:
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    return checkpoints.artifact(model_dir, **OPTIONS)


@pytest.fixture
def artifact(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "artifact"))


def edit(root: Path, change) -> None:
    data = json.loads((root / MANIFEST).read_text())
    change(data)
    (root / MANIFEST).write_text(json.dumps(data))


def load_error(root: Path) -> str:
    with pytest.raises(ArtifactError) as info:
        xllm_compiler.load(root)
    return str(info.value)


def test_the_manifest_round_trips_through_the_schema(pristine):
    data = json.loads((pristine / MANIFEST).read_text())
    manifest = Manifest.from_json(data)
    assert manifest.to_json() == data
    assert Manifest.from_json(json.loads(json.dumps(manifest.to_json()))) == manifest
    assert manifest.format_version == FORMAT_VERSION
    assert read_manifest(pristine) == manifest
    assert xllm_compiler.load(pristine).manifest == manifest


def test_each_fact_is_stored_once(pristine):
    data = json.loads((pristine / MANIFEST).read_text())
    assert not {"decode_buckets", "prefill_buckets", "max_seq_len", "block_size", "tp"} & set(data["options"])
    assert [b["num_tokens"] for b in data["buckets"] if b["phase"] == "decode"] == OPTIONS["decode_buckets"]
    assert data["model"]["max_seq_len"] == OPTIONS["max_seq_len"]
    assert "graphs" not in data  # each bucket names its own graph file
    assert len({b["graph"] for b in data["buckets"]} | {data["fallback_graph"]}) == len(data["buckets"]) + 1


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda m: m["model"].pop("num_layers"), "model.num_layers is missing"),
        (lambda m: m["model"].update(num_layers="2"), "model.num_layers must be an integer"),
        (lambda m: m["model"].update(num_layers=True), "model.num_layers must be an integer"),
        (lambda m: m["model"].update(num_layers=0), "model.num_layers must be positive"),
        (lambda m: m["model"].update(dtype="float8"), "model.dtype must be one of"),
        (lambda m: m["model"].update(eos_token_ids=[1, "2"]), "model.eos_token_ids[1] must be an integer"),
        (lambda m: m["model"].update(bos_token_id="x"), "model.bos_token_id must be an integer or null"),
        (lambda m: m["kv_cache"].update(block_size=1.5), "kv_cache.block_size must be an integer"),
        (lambda m: m.pop("kv_cache"), "kv_cache is missing"),
        (lambda m: m["buckets"][0].pop("graph"), "buckets[0].graph is missing"),
        (lambda m: m["buckets"][0].update(phase="warmup"), "buckets[0].phase must be"),
        (lambda m: m["buckets"].append(dict(m["buckets"][0])), "buckets list a bucket twice"),
        (lambda m: m["buckets"][0].update(graph="graphs/elsewhere.json"), "buckets[0].graph names"),
        (lambda m: m.update(fallback_graph=7), "fallback_graph must be a string"),
        (lambda m: m["tensor_parallel"].update(size=2), "tensor_parallel.weights must name one file per rank"),
        (lambda m: m["tensor_parallel"].update(weights="weights.safetensors"), "tensor_parallel.weights must be"),
        (lambda m: m["inputs"][0].update(name="tokens"), "inputs are not the calling convention"),
        (lambda m: m["files"]["report.json"].update(bytes="12"), "files['report.json'].bytes must be an integer"),
        (lambda m: m.update(tokenizer="vocab.json"), "tokenizer names 'vocab.json'"),
        (lambda m: m.update(created_by=[]), "created_by must be an object"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_missing_or_mistyped_field_fails_in_load_naming_it(artifact, change, named):
    edit(artifact, change)
    message = load_error(artifact)
    assert MANIFEST in message and named in message, message


def test_an_artifact_written_before_an_optional_field_existed_still_loads(artifact):
    """Fields added with a default (the chat template, speculation's k) are optional in format 2: an artifact
    written before them loads, and reads as not using them."""
    optional = [f.name for f in dataclasses.fields(Manifest) if f.default is not dataclasses.MISSING]
    edit(artifact, lambda m: [m.pop(name) for name in optional if name not in ("format_version",)])
    manifest = xllm_compiler.load(artifact).manifest
    assert manifest.num_speculative_tokens == 0 and manifest.chat_template is None


def test_an_older_format_is_refused_with_both_versions_named(artifact):
    edit(artifact, lambda m: m.update(format_version=1))
    message = load_error(artifact)
    assert "format_version 1" in message and str(FORMAT_VERSION) in message and "recompile" in message


def test_no_manifest_key_is_read_outside_the_schema():
    """manifest.json's keys are read in xllm_compiler/artifact/schema.py only: elsewhere it is a Manifest."""
    pattern = re.compile(r"manifest(\.get\(|\[)|MANIFEST\)\.read_text|manifest\.json\"\)\.read_text")
    sources = [p for top in ("xllm_compiler", "runtime", "passes", "models") for p in (REPO / top).rglob("*.py")]
    offenders = [
        f"{path.relative_to(REPO)}:{n}"
        for path in sources
        if path.relative_to(REPO).as_posix()
        not in ("xllm_compiler/artifact/schema.py", "xllm_compiler/artifact/manifest.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders


def _modules_imported_by(statement: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True, check=True
    )
    return {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}


def test_reading_artifacts_does_not_load_the_compiler():
    modules = _modules_imported_by("import xllm_compiler.runtime")
    compile_side = {
        m
        for m in modules
        if m.startswith(("xllm_compiler.passes", "xllm_compiler.models", "xllm_compiler.capture"))
        or m in {"xllm_compiler.compiler", "xllm_compiler.artifact.writer", "xllm_compiler.buckets.specialize"}
    }
    assert not compile_side, sorted(compile_side)


def test_the_cli_module_loads_no_pass_until_it_compiles():
    modules = _modules_imported_by("import xllm_compiler.cli, xllm_compiler.run")
    assert not {m for m in modules if m.startswith(("xllm_compiler.passes", "xllm_compiler.models"))}
