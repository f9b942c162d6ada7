"""GPTQ and AWQ checkpoints as published: exact dequantization, 4-bit layers kept in their integers (linear_w4),
parity with transformers, errors naming the tensor."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import xllm_compiler
from tests.cli_calls import assert_one_line, call
from tests.hf_oracle import hf_greedy, hf_last_logits, mixed_prompts
from tests.int_quant_checkpoint import awq_config, awq_tensors, gptq_config, gptq_tensors, quantize_checkpoint
from tests.test_hf_parity import relative_error
from xllm_compiler import cli
from xllm_compiler.errors import CheckpointError
from xllm_compiler.models.config import MoESpec
from xllm_compiler.models.int_quant import IntQuant
from xllm_compiler.models.quantization import checkpoint_quantization
from xllm_compiler.models.weights import Checkpoint, load_experts
from xllm_compiler.ops import native
from xllm_compiler.ops.quant import dequantize_per_group, linear_w4_kernel
from xllm_compiler.runtime.platform import cpu

SMALL = dict(dtype="float32", decode_buckets=[4], prefill_buckets=[64], max_seq_len=64)
#: One linear of N = 16 outputs, K = 64 inputs: 2 groups of 32.
SHAPE = (16, 64)


def write(model_dir: Path, tensors: dict[str, torch.Tensor], quant: dict | None) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(model_dir / "model.safetensors"))
    config = {} if quant is None else {"quantization_config": quant}
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


def load_one(model_dir: Path, name: str = "w.weight", shape=SHAPE, shard=None) -> torch.Tensor:
    config = json.loads((model_dir / "config.json").read_text())
    with Checkpoint(model_dir, checkpoint_quantization(config)) as checkpoint:
        return checkpoint.load(name, shape, torch.float32, shard)


def test_packing_conventions_on_hand_written_words(tmp_path):
    """GPTQ: word 0x76543210 holds q = 0..7 down K (low bits first), zeros are stored minus one; AWQ: word
    0x75316420 holds columns 0..7 in the order 0, 2, 4, 6, 1, 3, 5, 7. 0xFEDCBA98 is a negative int32."""
    words = torch.tensor([0x76543210, 0xFEDCBA98 - 2**32] * 4, dtype=torch.int32)
    gptq = {
        "w.qweight": words[None, :].contiguous(),  # [K/8 = 1, N = 8]
        "w.qzeros": torch.tensor([[0x77777777]], dtype=torch.int32),  # zero 7 + 1 = 8 for all 8 outputs
        "w.scales": torch.full((1, 8), 0.5, dtype=torch.float16),
        "w.g_idx": torch.zeros(8, dtype=torch.int32),
    }
    weight = load_one(write(tmp_path / "gptq", gptq, gptq_config(4, -1, False)), shape=(8, 8))
    k = torch.arange(8.0)
    assert torch.equal(weight[0], (k - 8) * 0.5) and torch.equal(weight[1], (k + 8 - 8) * 0.5)
    awq = {
        "w.qweight": torch.full((8, 1), 0x75316420, dtype=torch.int32),  # [K = 8, N/8 = 1]
        "w.qzeros": torch.tensor([[0x33333333]], dtype=torch.int32),
        "w.scales": torch.full((1, 8), 2.0, dtype=torch.float16),
    }
    weight = load_one(write(tmp_path / "awq", awq, awq_config(8)), shape=(8, 8))
    assert torch.equal(weight, ((torch.arange(8.0) - 3) * 2.0)[:, None].expand(8, 8))


CASES = {
    "gptq4-g32": (gptq_config(4, 32, False), dict(bits=4, group_size=32, act_order=False)),
    "gptq4-g32-act-order": (gptq_config(4, 32, True), dict(bits=4, group_size=32, act_order=True)),
    "gptq4-per-row-act-order": (gptq_config(4, -1, True), dict(bits=4, group_size=-1, act_order=True)),
    "gptq8-g32-act-order": (gptq_config(8, 32, True), dict(bits=8, group_size=32, act_order=True)),
    "gptq8-per-row": (gptq_config(8, -1, False), dict(bits=8, group_size=-1, act_order=False)),
    "gptq4-v2-asym": (gptq_config(4, 32, True, False, True), dict(bits=4, group_size=32, act_order=True, v2=True)),
}


def one_linear(case: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
    weight = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(3))
    if case == "awq-g32":
        packed, meant = awq_tensors(weight, 32)
        return {"w" + s: t for s, t in packed.items()}, meant, awq_config(32)
    quant, kwargs = CASES[case]
    packed, meant = gptq_tensors(weight, sym=quant["sym"], **kwargs)
    assert (meant - weight).abs().max() <= weight.abs().max() / 2 ** (kwargs["bits"] - 2)  # it quantized
    return {"w" + s: t for s, t in packed.items()}, meant, quant


@pytest.mark.parametrize("case", [*CASES, "awq-g32"])
def test_checkpoint_yields_exactly_the_weight_the_integers_mean(tmp_path, case):
    tensors, meant, quant = one_linear(case)
    model_dir = write(tmp_path, {**tensors, "norm.weight": torch.ones(64)}, quant)
    with Checkpoint(model_dir, checkpoint_quantization(json.loads((model_dir / "config.json").read_text()))) as ckpt:
        assert sorted(ckpt.names()) == ["norm.weight", "w.weight"]
        assert "w.weight" in ckpt and "w.qweight" not in ckpt and "w.scales" not in ckpt
        whole = ckpt.load("w.weight", SHAPE, torch.float32)
        assert torch.equal(whole, meant)
        for dim, start, end in [(0, 0, 8), (0, 8, 16), (0, 3, 11), (1, 32, 64), (1, 5, 37)]:  # tensor-parallel
            index = (slice(None),) * dim + (slice(start, end),)
            assert torch.equal(ckpt.load("w.weight", SHAPE, torch.float32, (dim, start, end)), meant[index])
        assert torch.equal(ckpt.load("w.weight", SHAPE, torch.float16), meant.half())


def test_gptq_without_act_order_may_omit_g_idx(tmp_path):
    tensors, meant, quant = one_linear("gptq4-g32")
    tensors.pop("w.g_idx")
    assert torch.equal(load_one(write(tmp_path, tensors, quant)), meant)


def test_per_expert_packed_linears_stack_like_plain_ones(tmp_path):
    """GPTQ checkpoints of MoE models pack each expert's linears: load_experts stacks their dequantized
    weights (gate and up merged), a tensor-parallel rank's span of the intermediate dim included."""
    moe = MoESpec(2, 1, 32, (True,), True, True, 0, "mlp", ("gate_proj", "up_proj", "down_proj"))
    generator = torch.Generator().manual_seed(4)
    tensors, meant = {}, {}
    for i in range(2):
        for part, shape in (("gate_proj", (32, 64)), ("up_proj", (32, 64)), ("down_proj", (64, 32))):
            packed, meant[f"{i}.{part}"] = gptq_tensors(torch.randn(*shape, generator=generator), 4, 32, True, seed=i)
            tensors.update({f"mlp.experts.{i}.{part}{suffix}": t for suffix, t in packed.items()})
    model_dir = write(tmp_path, tensors, gptq_config(4, 32, True))
    with Checkpoint(model_dir, checkpoint_quantization({"quantization_config": gptq_config(4, 32, True)})) as ckpt:
        gate_up = load_experts(ckpt, "mlp.experts.gate_up_proj", moe, (2, 64, 64), torch.float32)
        assert torch.equal(
            gate_up, torch.stack([torch.cat([meant[f"{i}.gate_proj"], meant[f"{i}.up_proj"]]) for i in range(2)])
        )
        down = load_experts(ckpt, "mlp.experts.down_proj", moe, (2, 64, 16), torch.float32, span=(16, 32))
        assert torch.equal(down, torch.stack([meant[f"{i}.down_proj"][:, 16:] for i in range(2)]))


#: The cases linear_w4 holds as stored (groups of a multiple of 32 inputs): id -> (whether the inputs are
#: reordered, group size). One group a row (K = 64) needs no order, act-order or not; 8 bits are two planes.
KEPT_INT4 = {
    "gptq4-g32": (False, 32),
    "gptq4-g32-act-order": (True, 32),
    "gptq4-per-row-act-order": (False, 64),
    "gptq4-v2-asym": (True, 32),
    "awq-g32": (False, 32),
    "gptq8-g32-act-order": (True, 32),
    "gptq8-per-row": (False, 64),
}


def int4_weight(model_dir: Path, shape=SHAPE, shard=None):
    config = json.loads((model_dir / "config.json").read_text())
    with Checkpoint(model_dir, checkpoint_quantization(config)) as checkpoint:
        return checkpoint.load_int4("w.weight", shape, shard)


def in_layer_order(weight, k_size: int = SHAPE[1]) -> torch.Tensor:
    """The float32 weight [N, K] an Int4Weight means, its inputs back in the layer's order (an 8-bit
    weight's two planes, each over every input, added)."""
    kernel_inputs = k_size if weight.input_order is None else weight.input_order.numel()
    values = dequantize_per_group(weight.qweight, weight.scale, weight.offset, kernel_inputs, weight.group_size)
    if weight.input_order is None:
        return values
    return torch.zeros(values.shape[0], k_size).index_add_(1, weight.input_order, values)


@pytest.mark.parametrize("case", sorted(KEPT_INT4))
def test_linears_convert_exactly_to_linear_w4(tmp_path, case):
    """(q - zero) * scale = q * scale + offset, bit for bit: every term is exact in float32, and an 8-bit
    q = 16 hi + lo splits into two such planes whose values add exactly. Act-order sorts the inputs by
    group, and linear_w4 on the input gathered in that order is x @ W.T."""
    reordered, group_size = KEPT_INT4[case]
    eight_bits = case.startswith("gptq8")
    tensors, meant, quant = one_linear(case)
    model_dir = write(tmp_path, tensors, quant)
    weight = int4_weight(model_dir)
    kernel_inputs = SHAPE[1] * (2 if eight_bits else 1)
    assert weight.group_size == group_size and weight.qweight.dtype == torch.uint8
    assert weight.qweight.shape == (16, kernel_inputs // 2) and weight.scale.shape == (16, kernel_inputs // group_size)
    if eight_bits:
        assert weight.input_order.shape == (kernel_inputs,)
        if not reordered:
            assert torch.equal(weight.input_order, torch.arange(64).repeat(2))
    else:
        assert (weight.input_order is not None) == reordered
    assert torch.equal(in_layer_order(weight), meant)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(5))
    gathered = x if weight.input_order is None else x.index_select(-1, weight.input_order)
    y = linear_w4_kernel(gathered, weight.qweight, weight.scale, weight.offset, weight.group_size)
    assert relative_error(y, x.double() @ meant.double().T) < 1e-5
    rows = int4_weight(model_dir, shard=(0, 3, 11))
    assert torch.equal(in_layer_order(rows), meant[3:11])
    inputs = int4_weight(model_dir, shard=(1, 32, 64))
    if reordered or group_size == 64 or eight_bits:
        assert inputs is None  # the slice splits a group, or its inputs are scattered over the groups or planes
    else:
        assert torch.equal(dequantize_per_group(inputs.qweight, inputs.scale, inputs.offset, 32, 32), meant[:, 32:])
    assert int4_weight(model_dir, shard=(1, 5, 37)) is None


def test_a_row_group_is_cut_into_kernel_groups(tmp_path):
    """One group a row over K = 192 (not a group size linear_w4 takes) is the same zero and scale over
    every input: it is held as 3 groups of 64, exactly."""
    weight = torch.randn(16, 192, generator=torch.Generator().manual_seed(4))
    packed, meant = gptq_tensors(weight, bits=4, group_size=-1, act_order=False, sym=True)
    model_dir = write(tmp_path, {"w" + s: t for s, t in packed.items()}, gptq_config(4, -1, False))
    kept = int4_weight(model_dir, shape=(16, 192))
    assert kept.group_size == 64 and kept.scale.shape == (16, 3)
    assert torch.equal(in_layer_order(kept, 192), meant)


def test_linears_no_kernel_group_holds_load_as_floats(tmp_path):
    """An 8-bit group that does not tile K (K = 48, groups of 32) cannot lay its planes side by side."""
    weight = torch.randn(16, 48, generator=torch.Generator().manual_seed(4))
    packed, meant = gptq_tensors(weight, bits=8, group_size=32, act_order=False, sym=True)
    model_dir = write(tmp_path, {"w" + s: t for s, t in packed.items()}, gptq_config(8, 32, False))
    assert int4_weight(model_dir, shape=(16, 48)) is None
    assert torch.equal(load_one(model_dir, shape=(16, 48)), meant)


#: (architecture, config overrides, quantization_config, projections left float, linear layers kept in 4 bits).
#: Qwen2 adds q/k/v biases (stored as plain X.bias next to the packed weights); AWQ leaves one layer's down_proj
#: out, as modules_to_not_convert says.
PARITY = {
    "gptq4-g32-act-order": ("LlamaForCausalLM", {}, gptq_config(4, 32, True), (), 14),
    "gptq4-g32-qwen2": ("Qwen2ForCausalLM", {}, gptq_config(4, 32, False), (), 14),
    "gptq8-per-row": ("Qwen2ForCausalLM", {}, gptq_config(8, -1, False), (), 14),
    "gptq8-g32-act-order": ("LlamaForCausalLM", {}, gptq_config(8, 32, True), (), 14),
    "awq-g32": ("LlamaForCausalLM", {}, awq_config(32, ["layers.1.mlp.down_proj"]), ("layers.1.mlp.down_proj",), 13),
}
#: linear_w4 calls a graph makes for the 2-layer test model: Q, K and V merged, gate and up merged (act-order
#: too: one gather order for the layer's input), o and down each alone: 4 a layer (less a layer left float).
MERGED_INT4_CALLS = 8
#: The native int4 kernel rounds each group of its inputs to int8 (ops/cpu_int4.cpp), measured at 1.0-1.6%
#: of the largest logit on these checkpoints; the composite is weight-only float32, within float rounding.
NATIVE_TOLERANCE = 0.05


def _linear_w4_calls(root: Path) -> int:
    graph = json.loads((root / json.loads((root / "manifest.json").read_text())["fallback_graph"]).read_text())
    return json.dumps(graph).count("xllm.linear_w4")


@pytest.mark.parametrize("case", sorted(PARITY))
def test_quantized_checkpoint_compiles_to_transformers_on_its_dequantized_weights(
    checkpoints, tmp_path, monkeypatch, case
):
    architecture, overrides, quant, skip, kept = PARITY[case]
    src, hf_model = checkpoints.checkpoint(architecture, **overrides)
    meant = quantize_checkpoint(src, tmp_path / "quantized", quant, skip)
    stored = load_file(tmp_path / "quantized" / "model.safetensors")
    assert sum(n.endswith(".qweight") for n in stored) == 2 * 7 - len(skip)
    oracle = copy.deepcopy(hf_model)
    oracle.load_state_dict(meant)
    root = checkpoints.artifact(tmp_path / "quantized", **SMALL)
    record = json.loads((root / "manifest.json").read_text())["checkpoint_quantization"]
    act_order = quant.get("desc_act", False)
    scheme = dict(
        method=quant["quant_method"],
        bits=quant["bits"],
        group_size=quant["group_size"],
        act_order=act_order,
        linear_layers=kept,
    )
    assert record == (scheme if kept else None)
    assert _linear_w4_calls(root) == (MERGED_INT4_CALLS - len(skip) if kept else 0)
    prompts = mixed_prompts(hf_model.config.vocab_size)
    expected = hf_last_logits(oracle, prompts)
    with monkeypatch.context() as patch:
        patch.setattr(cpu, "native_kernels", lambda: None)  # linear_w4's composite: the weights as they are
        model = xllm_compiler.load(root)
        assert relative_error(model.logits(prompts), expected) < 1e-5
        ours = model.generate(prompts, max_new_tokens=16, ignore_eos=True)
        assert ours == [hf_greedy(oracle, p, 16) for p in prompts]
    if kept and native.native_kernels() is not None:
        assert relative_error(xllm_compiler.load(root).logits(prompts), expected) < NATIVE_TOLERANCE


def edited(case: str, edit) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, _, quant = one_linear(case)
    edit(tensors)
    return tensors, quant


@pytest.mark.parametrize(
    ("case", "edit", "fragments"),
    [
        ("gptq4-g32", lambda t: t.pop("w.qzeros"), ["'w.qweight'", "4-bit GPTQ", "'w.qzeros' is missing"]),
        ("gptq4-g32", lambda t: t.pop("w.scales"), ["'w.scales' is missing"]),
        ("gptq4-g32-act-order", lambda t: t.pop("w.g_idx"), ["'w.g_idx' is missing"]),
        ("awq-g32", lambda t: t.pop("w.qzeros"), ["'w.qweight'", "4-bit AWQ", "'w.qzeros' is missing"]),
        (
            "gptq4-g32",
            lambda t: t.update({"w.scales": t["w.scales"][:1]}),
            ["'w.scales'", "[1, 16]", "expected [2, 16]"],
        ),
        ("gptq4-g32", lambda t: t.update({"w.qzeros": t["w.qzeros"][:1]}), ["'w.qzeros'", "[1, 2]", "expected [2, 2]"]),
        ("gptq4-g32", lambda t: t.update({"w.qweight": t["w.qweight"][:4]}), ["'w.qweight'", "[4, 16]", "[8, 16]"]),
        ("awq-g32", lambda t: t.update({"w.qweight": t["w.qweight"].t()}), ["'w.qweight'", "[2, 64]", "[64, 2]"]),
        ("gptq4-g32", lambda t: t.update({"w.g_idx": t["w.g_idx"][:32]}), ["'w.g_idx'", "[32]", "expected [64]"]),
        ("gptq4-g32", lambda t: t.update({"w.g_idx": t["w.g_idx"] + 1}), ["'w.g_idx'", "group 2", "[0, 2)"]),
        ("gptq4-g32", lambda t: t.update({"w.scales": t["w.scales"].to(torch.int32)}), ["'w.scales'", "I32"]),
        ("awq-g32", lambda t: t.update({"w.qweight": t["w.qweight"].float()}), ["'w.qweight'", "F32", "I32"]),
    ],
    ids=[
        "gptq-qzeros-missing",
        "gptq-scales-missing",
        "act-order-g_idx-missing",
        "awq-qzeros-missing",
        "scales-wrong-shape",
        "qzeros-wrong-shape",
        "qweight-wrong-shape",
        "awq-qweight-wrong-shape",
        "g_idx-wrong-shape",
        "g_idx-out-of-range",
        "scales-not-float",
        "qweight-not-int32",
    ],
)
def test_bad_packed_tensors_are_named(tmp_path, case, edit, fragments):
    tensors, quant = edited(case, edit)
    with pytest.raises(CheckpointError) as error:
        load_one(write(tmp_path, tensors, quant))
    assert "\n" not in str(error.value)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_packed_tensors_need_their_quantization_config(tmp_path):
    tensors, _, _ = one_linear("gptq4-g32")
    with pytest.raises(CheckpointError, match=r"'w\.qweight' holds packed integers but config\.json has no"):
        load_one(write(tmp_path, tensors, None))
    with pytest.raises(CheckpointError, match=r"'w.weight' \[16, 60\] has K = 60, not a multiple of 8"):
        load_one(write(tmp_path, tensors, gptq_config(4, 32, False)), shape=(16, 60))


@pytest.mark.parametrize(
    ("quant", "fragment"),
    [
        ({**gptq_config(4, 32, False), "bits": 3}, "bits 3 is not supported for 'gptq' (supported: 4, 8)"),
        ({**gptq_config(4, 32, False), "bits": 2}, "bits 2"),
        ({"quant_method": "gptq", "group_size": 128}, "for 'gptq' has no 'bits'"),
        ({**gptq_config(4, 32, False), "group_size": 0}, "group_size must be a positive int or -1, got 0"),
        ({**gptq_config(4, 32, False), "group_size": "128"}, "group_size must be"),
        ({**gptq_config(4, 32, False), "desc_act": "yes"}, "desc_act must be true or false"),
        ({**gptq_config(4, 32, False), "checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
        ({**gptq_config(4, 32, False), "dynamic": {"-:.*down": {}}}, "dynamic (per-module overrides)"),
        ({**awq_config(32), "bits": 8}, "bits 8 is not supported for 'awq' (supported: 4)"),
        ({**awq_config(32), "version": "gemv"}, "version 'gemv' is not supported for 'awq' (supported: 'gemm')"),
        ({**awq_config(32), "version": "GEMV_FAST"}, "version 'GEMV_FAST'"),
        ({**awq_config(32), "zero_point": False}, "zero_point False is not supported for 'awq'"),
        ({**awq_config(32), "backend": "llm-awq"}, "backend 'llm-awq'"),
        ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not supported (supported: 'awq', 'fp8'"),
        ({"bits": 4}, "quant_method None is not supported"),
    ],
)
def test_unsupported_gptq_and_awq_configs_are_refused_by_name(quant, fragment):
    with pytest.raises(CheckpointError) as error:
        checkpoint_quantization({"quantization_config": quant})
    assert fragment in str(error.value)


def test_gptq_and_awq_configs_as_published():
    assert checkpoint_quantization({"quantization_config": gptq_config(4, 128, True)}) == IntQuant(
        "gptq", 4, 128, zero_offset=1, desc_act=True
    )
    assert checkpoint_quantization({"quantization_config": gptq_config(8, -1, False, v2=True)}) == IntQuant(
        "gptq", 8, -1, zero_offset=0
    )
    autoawq = {"quant_method": "awq", "w_bit": 4, "q_group_size": 128, "zero_point": True, "version": "GEMM"}
    assert checkpoint_quantization({"quantization_config": autoawq}) == IntQuant("awq", 4, 128)


def test_compile_names_a_missing_scale_on_one_line(checkpoints, tmp_path, capsys):
    src, _ = checkpoints.checkpoint("LlamaForCausalLM")
    quantize_checkpoint(src, tmp_path / "model", gptq_config(4, 32, False))
    tensors = load_file(tmp_path / "model" / "model.safetensors")
    tensors.pop("model.layers.1.mlp.down_proj.scales")
    save_file(tensors, str(tmp_path / "model" / "model.safetensors"))
    args = ["--decode-buckets", "1", "--prefill-buckets", "16", "--max-seq-len", "64", "--quiet"]
    rc, stdout, err = call(cli.main, [tmp_path / "model", tmp_path / "out", *args], capsys)
    assert rc == 2 and stdout == ""
    assert_one_line(err, "xllm-compile", "'model.layers.1.mlp.down_proj.qweight'", "down_proj.scales' is missing")


def test_moe_checkpoint_keeps_attention_and_shared_expert_in_4_bits(checkpoints, tmp_path, monkeypatch):
    """Qwen2-MoE packed by GPTQ (act-order): the routed experts load dequantized into the stacked expert
    weights, attention and the shared expert stay in their integers (2 layers x 7 linears); on the
    composites the artifact equals one compiled from a float checkpoint of the weights the integers mean."""
    src, hf_model = checkpoints.checkpoint("Qwen2MoeForCausalLM")
    meant = quantize_checkpoint(src, tmp_path / "gptq", gptq_config(4, 32, True))
    plain = tmp_path / "plain"
    plain.mkdir()
    save_file({name: tensor.contiguous() for name, tensor in meant.items()}, str(plain / "model.safetensors"))
    (plain / "config.json").write_text((src / "config.json").read_text())
    quantized, reference = (checkpoints.artifact(d, **SMALL) for d in (tmp_path / "gptq", plain))
    assert json.loads((quantized / "manifest.json").read_text())["checkpoint_quantization"]["linear_layers"] == 14
    monkeypatch.setattr(cpu, "native_kernels", lambda: None)
    ours, theirs = xllm_compiler.load(quantized), xllm_compiler.load(reference)
    prompts = mixed_prompts(hf_model.config.vocab_size)
    assert relative_error(ours.logits(prompts), theirs.logits(prompts)) < 1e-5
    greedy = {"max_new_tokens": 8, "ignore_eos": True}
    assert ours.generate(prompts, **greedy) == theirs.generate(prompts, **greedy)


def test_compile_summary_names_the_layers_kept_in_4_bits(checkpoints, tmp_path, capsys):
    src, _ = checkpoints.checkpoint("LlamaForCausalLM")
    quantize_checkpoint(src, tmp_path / "model", awq_config(32))
    args = ["--decode-buckets", "1", "--prefill-buckets", "16", "--max-seq-len", "64", "--cache-dir", ""]
    rc, stdout, _ = call(cli.main, [tmp_path / "model", tmp_path / "out", *args], capsys)
    assert rc == 0
    assert "4-bit AWQ weights in 14 layers" in " ".join(stdout.split())
