"""A model compiled with ``quantize="int8"`` against the same model unquantized, through load() and generate().

Measured, not assumed: the logits of the last position of mixed-length prompts stay within 5% of the largest
logit (int8 weights and the CPU kernel's int8 input rows each round to 1/254 of a row's range; a tiny random
model moves about 1%), and on the bundled trained model (tools/tiny-llama, which has real structure) the
greedy next token agrees with the float32 artifact's at nearly every position of its corpus.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import xllm_compiler
from tests.hf_oracle import mixed_prompts
from xllm_compiler import cli
from xllm_compiler.errors import OptionsError
from xllm_compiler.ops import native

TINY_LLAMA = Path(__file__).resolve().parents[2] / "tools" / "tiny-llama"
BUCKETS = dict(decode_buckets=[1, 2], prefill_buckets=[32])
LOGIT_TOLERANCE = 0.05


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_logits_close_to_the_unquantized_artifact(checkpoints, dtype):
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    plain = xllm_compiler.load(checkpoints.artifact(model_dir, dtype=dtype, **BUCKETS))
    root = checkpoints.artifact(model_dir, dtype=dtype, quantize="int8", **BUCKETS)
    quantized = xllm_compiler.load(root)
    prompts = mixed_prompts(plain.vocab_size)  # 1 to 40 tokens: longer than the prefill bucket too
    assert _relative(quantized.logits(prompts), plain.logits(prompts)) <= LOGIT_TOLERANCE
    record = quantized.manifest.quantization
    layers = quantized.manifest.model.num_layers
    assert (record.scheme, record.granularity, record.lm_head, record.linear_layers) == (
        "int8",
        "per_output_channel",
        True,
        4 * layers + 1,
    )
    assert plain.manifest.quantization is None
    with safe_open(str(root / "weights.safetensors"), framework="pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 (not a dict)
    assert sum(d == "I8" for d in dtypes.values()) == 4 * layers + 1
    assert not any(name.endswith(("proj.weight", "lm_head.weight")) for name in dtypes)


def test_the_cpu_runs_the_int8_kernel_on_packed_weights(checkpoints):
    module = native.native_kernels()
    if module is None or "float32" not in module.int8_linear_dtypes():
        pytest.skip("no int8 kernel in this build: the composite runs")
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    model = xllm_compiler.load(checkpoints.artifact(model_dir, dtype="float32", quantize="int8", **BUCKETS))
    layers = model.manifest.model.num_layers
    for name, graph in model.engine.graphs._graphs.items():
        targets = [n.target for n in graph.nodes if n.op == "call_function"]
        calls = sum(t in (module.int8_linear_out, module.int8_linear) for t in targets)
        assert calls == 4 * layers + 1, name
        assert not any(getattr(t, "__name__", "").startswith("linear_w8") for t in targets), name


def test_greedy_tokens_of_the_trained_tiny_model_mostly_agree(tmp_path):
    """Teacher-forced top-1 agreement over corpus prefixes (up to 400 tokens, past every prefill bucket), and
    free-running greedy of three prompts (more than the largest decode bucket; one longer than the prefill
    bucket)."""
    options = dict(dtype="float32", cache_dir="", **BUCKETS)
    xllm_compiler.compile(TINY_LLAMA, tmp_path / "f32", **options)
    xllm_compiler.compile(TINY_LLAMA, tmp_path / "int8", quantize="int8", **options)
    plain = xllm_compiler.load(tmp_path / "f32")
    quantized = xllm_compiler.load(tmp_path / "int8")
    ids = plain.encode((TINY_LLAMA / "corpus.txt").read_text())[:400]
    prefixes = [ids[:n] for n in range(8, 400, 12)]
    agree = (quantized.logits(prefixes).argmax(-1) == plain.logits(prefixes).argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree
    prompts = [ids[:5], ids[40:49], ids[100:160]]
    got = quantized.generate(prompts, max_new_tokens=12)
    expected = plain.generate(prompts, max_new_tokens=12)
    assert quantized.stats()["hits"] > 0
    assert sum(g[:4] == e[:4] for g, e in zip(got, expected, strict=True)) >= 2


def test_bad_quantize_options_are_refused(checkpoints, tmp_path):
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    with pytest.raises(OptionsError, match="quantize 'int3' is not a supported scheme"):
        xllm_compiler.compile(model_dir, tmp_path / "a", quantize="int3")
    with pytest.raises(OptionsError, match="needs the pass quantize_linear_weights"):
        xllm_compiler.compile(model_dir, tmp_path / "b", quantize="int8", disable_passes=["quantize_linear_weights"])
    with pytest.raises(OptionsError, match="--verify"):
        xllm_compiler.compile(model_dir, tmp_path / "c", quantize="int8", verify=True)


def test_the_scheme_is_in_the_cache_key(checkpoints, tmp_path):
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    options = dict(cache_dir=str(tmp_path / "cache"), decode_buckets=[1], prefill_buckets=[32])
    keys = [
        xllm_compiler.compile(model_dir, tmp_path / f"out{i}", **options, **extra)["cache"]["key"]
        for i, extra in enumerate([{}, {"quantize": "int8"}, {"quantize": "int8", "quantize_lm_head": False}])
    ]
    assert len(set(keys)) == 3


def test_the_cli_refuses_an_unknown_scheme_in_one_line(checkpoints, tmp_path, capsys):
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    capsys.readouterr()  # what writing the checkpoint printed
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(model_dir), str(tmp_path / "out"), "--quantize", "int3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "int3" in err and len(err.splitlines()) == 1 and "Traceback" not in err
