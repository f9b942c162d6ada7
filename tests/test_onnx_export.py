"""ONNX export: exported bucket graphs pass onnx.checker and, run in onnxruntime, give our runtime's logits.

The reference is our own runtime on the same artifact (``xllm_compiler.load``), fed the same step inputs
and the same KV cache: a prefill of two prompts, then decode steps that feed each step's
``present_kv_cache_*`` outputs back as the next step's ``kv_cache_*`` inputs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xllm_compiler
from tests.cli_calls import call
from tests.hf_oracle import ARCHITECTURE_CONFIGS
from tests.int_quant_checkpoint import gptq_config, quantize_checkpoint
from xllm_compiler import cli
from xllm_compiler.errors import OptionsError
from xllm_compiler.runtime.platform import cpu
from xllm_compiler.runtime.step import Sequence, build_step_inputs

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

#: The buckets exported, of the default series: prefill_32 holds the two prompts, decode_2 their steps.
BUCKETS = {"prefill": 32, "decode": 2}
PROMPT_LENS = (19, 7)  # one past Mistral's sliding window of 16
DECODE_STEPS = 3
TOLERANCE = 1e-4  # relative to the largest logit


@pytest.fixture(scope="module")
def artifacts(checkpoints) -> dict[str, Path]:
    """Each architecture's artifact with the default options (shared with the other suites that use them)."""
    return {arch: checkpoints.artifact(checkpoints.checkpoint(arch)[0]) for arch in ARCHITECTURE_CONFIGS}


def session(path: Path):
    onnx.checker.check_model(str(path), full_check=True)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURE_CONFIGS))
def test_exported_graphs_match_the_runtime_through_prefill_and_decode(architecture, artifacts, tmp_path):
    check_against_the_runtime(artifacts[architecture], tmp_path, architecture)


#: Quantized linears: compiled int8 and int4 weights, and GPTQ checkpoints kept in their integers (4-bit
#: act-order; 8-bit, two 4-bit planes): case -> (compile options, the GPTQ bits or None).
QUANTIZED = {
    "int8": (dict(quantize="int8"), None),
    "int4-g32": (dict(quantize="int4", group_size=32), None),
    "gptq4-act-order": (dict(), 4),
    "gptq8-act-order": (dict(), 8),
}


@pytest.mark.parametrize("case", sorted(QUANTIZED))
def test_quantized_linears_export_weight_only(checkpoints, tmp_path, monkeypatch, case):
    """linear_w8 and linear_w4 export as their weight-only composites (the packed integers dequantized in
    the graph), so the reference is the runtime on the composites too: the CPU kernels round their inputs to
    int8 as well (tests/quant)."""
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    options, gptq_bits = QUANTIZED[case]
    if gptq_bits is not None:
        quantize_checkpoint(model_dir, tmp_path / "gptq", gptq_config(gptq_bits, 32, True))
        model_dir = tmp_path / "gptq"
    artifact = checkpoints.artifact(model_dir, **options)
    monkeypatch.setattr(cpu, "native_kernels", lambda: None)
    check_against_the_runtime(artifact, tmp_path, case)


def check_against_the_runtime(artifact: Path, tmp_path: Path, label: str) -> None:
    """The exported prefill and decode buckets of ``artifact`` in onnxruntime, step by step against the
    runtime: logits and the KV cache each step writes."""
    from xllm_compiler.onnx import onnx_inputs

    sessions = {
        phase: session(xllm_compiler.export_onnx(artifact, tmp_path / f"{phase}.onnx", phase, size))
        for phase, size in BUCKETS.items()
    }
    model = xllm_compiler.load(artifact, kv_blocks=16)
    num_seqs = {e.phase: e.num_seqs for e in model.manifest.buckets if e.num_tokens == BUCKETS[e.phase]}
    engine = model.engine
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in PROMPT_LENS]
    seqs = [
        Sequence(tokens=p, prompt_len=len(p), blocks=engine.pool.allocate(engine.blocks_for(len(p) + DECODE_STEPS)))
        for p in prompts
    ]
    caches = [layer.clone() for layer in engine.kv_cache.layers]  # the runtime's cache, zeroed where used

    def step(phase: str, work: list[tuple[Sequence, int]]) -> torch.Tensor:
        nonlocal caches
        sizes = (BUCKETS[phase], num_seqs[phase], engine.block_size, engine.max_blocks_per_seq)
        inputs = build_step_inputs(work, *sizes, torch.device("cpu"))
        width = max(len(s.blocks) for s, _ in work)  # the block table's width is symbolic: pass what is used
        inputs["block_tables"] = inputs["block_tables"][:, :width]
        logits, *present = sessions[phase].run(None, onnx_inputs(inputs, caches))
        caches = [torch.from_numpy(c) for c in present]
        want = engine.step(phase, work)
        got = torch.from_numpy(logits[: len(work)])
        assert relative_error(got, want) < TOLERANCE, f"{label} {phase}"
        return want

    logits = step("prefill", [(s, s.prompt_len) for s in seqs])
    for _ in range(DECODE_STEPS):
        for seq, token in zip(seqs, logits.argmax(-1).tolist(), strict=True):
            seq.tokens.append(token)
        logits = step("decode", [(s, 1) for s in seqs])
    used = [0, *(b for s in seqs for b in s.blocks)]  # the other blocks were never zeroed
    for ours, theirs in zip(engine.kv_cache.layers, caches, strict=True):
        assert relative_error(theirs[:, used], ours[:, used]) < TOLERANCE


def test_a_bucket_the_artifact_lacks_is_named(artifacts, tmp_path):
    artifact = artifacts["LlamaForCausalLM"]
    with pytest.raises(OptionsError, match=r"no decode bucket of 3 tokens \(its decode buckets: 1, 2, 4, 8\)"):
        xllm_compiler.export_onnx(artifact, tmp_path / "m.onnx", "decode", 3)
    with pytest.raises(OptionsError, match="phase 'verify' is not one of decode, prefill"):
        xllm_compiler.export_onnx(artifact, tmp_path / "m.onnx", "verify", 2)


def test_a_missing_package_is_named(artifacts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # what importlib reports for an absent package
    with pytest.raises(OptionsError, match=r"ONNX export needs onnxscript: pip install 'xllm-compiler\[onnx\]'"):
        xllm_compiler.export_onnx(artifacts["LlamaForCausalLM"], tmp_path / "m.onnx", "decode", 2)


def test_compile_with_export_onnx_writes_every_bucket(checkpoints, tmp_path, capsys):
    model_dir = checkpoints.checkpoint("Qwen2ForCausalLM")[0]
    buckets = ["--decode-buckets", "1", "--prefill-buckets", "16", "--max-seq-len", "64"]
    rc, _, err = call(cli.main, [model_dir, tmp_path / "out", *buckets, "--quiet", "--export-onnx", tmp_path], capsys)
    assert (rc, err) == (0, "")
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["decode_1.onnx", "prefill_16.onnx"]
    for path in tmp_path.glob("*.onnx"):
        onnx.checker.check_model(str(path), full_check=True)


def test_importing_the_package_does_not_import_onnx():
    code = "import sys, xllm_compiler; print(sorted(m for m in sys.modules if m.split('.')[0].startswith('onnx')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
