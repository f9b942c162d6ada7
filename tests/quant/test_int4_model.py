"""A model compiled with ``quantize="int4"`` against the same model unquantized, through the scheduler.

Each step's logits are compared with the unquantized artifact's logits of the same token prefixes (the int4
model's own greedy tokens fed back), relative to the largest logit. Measured on the tiny test Llama: int8
moves them 0.7% to 1.2%; int4 8.6% to 13% on the prompts' last positions and up to 24% on decode steps
(float32 with groups of 32: at most 17.5%; bfloat16 with groups of 128: at most 23%). That is the scheme's
expected size, not a defect: an int4 step is the group's range / 15 against int8's 2 amax / 254, about 17x
coarser, and 17 x 1.2% = 20%. The bound is 35%, 1.5x the largest measured. What pins the graphs is the
second check: the int4 artifact's decode buckets and fallback agree with its own prefill, so every graph runs
the same ``linear_w4`` on the same weights. With the composite (no native kernels) that holds to float
rounding. The CPU kernel (ops/cpu_int4.cpp) rounds each group of its inputs to int8, so a float-rounding
difference upstream (the decode attention kernel against prefill's) can move an input across a rounding
step, and the tiny random model amplifies that: measured 0.5% to 2.5% of the largest logit (float32 with
groups of 32, bfloat16 with 128), bounded at 5%.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import xllm_compiler
from tests.cli_calls import assert_one_line, call
from tests.hf_oracle import mixed_prompts
from xllm_compiler import cli
from xllm_compiler.errors import OptionsError
from xllm_compiler.ops import native
from xllm_compiler.runtime.requests import Request, SamplingParams

BUCKETS = dict(decode_buckets=[1, 2], prefill_buckets=[32])
LOGIT_TOLERANCE = 0.35
#: Bucket and fallback graphs against the same artifact's prefill: float32 rounding, or bfloat16's; where the
#: native int4 kernel runs, the rounding of its inputs to int8 too (see the top).
SELF_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
NATIVE_SELF_TOLERANCE = 0.05
NEW_TOKENS = 4


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _scheduled(model, prompts: list[list[int]], **limits) -> list[tuple[list[int], torch.Tensor]]:
    """Greedy (tokens, logits row of each step) of ``prompts`` through a scheduler with ``limits``."""
    params = SamplingParams(NEW_TOKENS, ignore_eos=True, return_logits=True)
    with torch.inference_mode():
        outputs = model.make_scheduler(**limits).run(Request(str(i), p, params) for i, p in enumerate(prompts))
    runs = [[o for o in outputs[str(i)] if o.new_tokens] for i in range(len(prompts))]  # chunks sampling nothing
    return [([t for o in run for t in o.new_tokens], torch.stack([o.logits for o in run])) for run in runs]


def _error_on_the_same_tokens(quantized, plain, prompts: list[list[int]], **limits) -> float:
    """The largest relative error of the int4 model's step logits against the unquantized artifact's logits
    of the same token prefixes (its own greedy tokens fed back, so the two never diverge)."""
    error = 0.0
    for prompt, (tokens, logits) in zip(prompts, _scheduled(quantized, prompts, **limits), strict=True):
        assert len(tokens) == NEW_TOKENS == len(logits)
        expected = plain.logits([prompt + tokens[:i] for i in range(NEW_TOKENS)])
        error = max(error, _relative(logits, expected))
    return error


@pytest.mark.parametrize(("dtype", "group_size"), [("float32", 32), ("bfloat16", 128)])
def test_int4_logits_close_to_the_unquantized_artifact(checkpoints, dtype, group_size):
    """Every step's logits: prefill chunks on the 32-token bucket, decode steps on the buckets of 1 and 2
    sequences, and (a step budget of 64, no prefix cache) the 40-token prompt whole on the fallback graph."""
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    plain = xllm_compiler.load(checkpoints.artifact(model_dir, dtype=dtype, **BUCKETS))
    root = checkpoints.artifact(model_dir, dtype=dtype, quantize="int4", group_size=group_size, **BUCKETS)
    quantized = xllm_compiler.load(root)
    prompts = mixed_prompts(plain.vocab_size)  # 5, 1, 23 and 40 tokens
    buckets = _error_on_the_same_tokens(quantized, plain, prompts)
    stats = quantized.stats()
    assert stats["hits"] + stats["misses"] == stats["steps"] and "fallbacks" not in stats, stats
    whole = dict(max_num_batched_tokens=64, enable_prefix_caching=False)
    fallback = _error_on_the_same_tokens(quantized, plain, prompts[3:], **whole)
    assert quantized.stats()["fallbacks"] == 1
    print(f"int4 {dtype} group {group_size}: buckets {buckets:.4f}, fallback {fallback:.4f} of the largest logit")
    assert max(buckets, fallback) <= LOGIT_TOLERANCE
    # Against itself (its own prefill of the same prefixes) the int4 artifact agrees to float rounding: every
    # graph runs the same linear_w4 on the same weights, whatever the bucket.
    kernels = native.native_kernels()
    runs_native = kernels is not None and dtype in kernels.int4_linear_dtypes()
    bound = NATIVE_SELF_TOLERANCE if runs_native else SELF_TOLERANCE[dtype]
    assert _error_on_the_same_tokens(quantized, quantized, prompts) <= bound
    assert _error_on_the_same_tokens(quantized, quantized, prompts[3:], **whole) <= bound
    record = quantized.manifest.quantization
    layers = quantized.manifest.model.num_layers
    assert (record.scheme, record.granularity, record.group_size, record.lm_head, record.linear_layers) == (
        "int4",
        "per_group",
        group_size,
        True,
        4 * layers + 1,
    )
    with safe_open(str(root / "weights.safetensors"), framework="pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 (not a dict)
    assert sum(d == "U8" for d in dtypes.values()) == 4 * layers + 1
    assert sum(name.endswith("_offset") for name in dtypes) == 4 * layers + 1
    assert not any(name.endswith(("proj.weight", "lm_head.weight")) for name in dtypes)


def test_the_lm_head_can_stay_float(checkpoints):
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    model = xllm_compiler.load(checkpoints.artifact(model_dir, quantize="int4", quantize_lm_head=False, **BUCKETS))
    record, layers = model.manifest.quantization, model.manifest.model.num_layers
    assert (record.lm_head, record.linear_layers, record.group_size) == (False, 4 * layers, 128)


def test_the_group_size_is_in_the_cache_key(checkpoints, tmp_path):
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    options = dict(cache_dir=str(tmp_path / "cache"), decode_buckets=[1], prefill_buckets=[32])
    keys = [
        xllm_compiler.compile(model_dir, tmp_path / f"out{i}", **options, **extra)["cache"]["key"]
        for i, extra in enumerate([{"quantize": "int8"}, {"quantize": "int4"}, {"quantize": "int4", "group_size": 64}])
    ]
    assert len(set(keys)) == 3
    default = xllm_compiler.compile(model_dir, tmp_path / "again", quantize="int4", group_size=128, **options)
    assert default["cache"]["key"] == keys[1]  # 128 is the default: the same compile


def test_bad_group_sizes_are_refused(checkpoints, tmp_path):
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    with pytest.raises(OptionsError, match="group_size 64 is for quantize 'int4' only, got quantize 'int8'"):
        xllm_compiler.compile(model_dir, tmp_path / "a", quantize="int8", group_size=64)
    with pytest.raises(OptionsError, match="group_size 64 is for quantize 'int4' only, got quantize 'none'"):
        xllm_compiler.compile(model_dir, tmp_path / "b", group_size=64)
    with pytest.raises(OptionsError, match="group_size must be one of 32, 64, 128, got 48"):
        xllm_compiler.compile(model_dir, tmp_path / "c", quantize="int4", group_size=48)
    with pytest.raises(OptionsError, match="--verify"):
        xllm_compiler.compile(model_dir, tmp_path / "d", quantize="int4", verify=True)


def test_the_cli_refuses_bad_group_sizes_in_one_line(checkpoints, tmp_path, capsys):
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    out = tmp_path / "out"
    rc, _, err = call(cli.main, [model_dir, out, "--group-size", "64"], capsys)
    assert rc == 2
    assert_one_line(err, "xllm-compile", "group_size 64", "quantize 'int4'")
    rc, _, err = call(cli.main, [model_dir, out, "--quantize", "int4", "--group-size", "48"], capsys)
    assert rc == 2
    assert_one_line(err, "xllm-compile", "--group-size", "48", "32, 64, 128")


def test_the_cli_summary_names_the_group_size(checkpoints, tmp_path, capsys):
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    artifact = tmp_path / "out"
    argv = [model_dir, artifact, "--quantize", "int4", "--group-size", "64", "--no-cache", "--quiet"]
    rc, _, err = call(cli.main, [*argv, "--decode-buckets", "1", "--prefill-buckets", "32"], capsys)
    assert rc == 0, err
    report = json.loads((artifact / "report.json").read_text())
    rows = {what: value.plain for what, value in cli.summary_rows(report, artifact)}
    assert rows["model"].endswith(", int4 (group 64) weights"), rows["model"]
