"""FP8 block-quantized checkpoints (DeepSeek's format): exact dequantization, parity, errors naming the tensor."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import xllm_compiler
from tests.cli_calls import assert_one_line, call
from tests.fp8_checkpoint import quantize_blocks, quantize_checkpoint_to_fp8, save_dequantized
from tests.hf_oracle import hf_in_float32, mixed_prompts
from tests.test_hf_parity import check_parity
from xllm_compiler import cli
from xllm_compiler.errors import CheckpointError
from xllm_compiler.models.fp8 import Fp8Blocks, dequantize
from xllm_compiler.models.quantization import checkpoint_quantization
from xllm_compiler.models.weights import Checkpoint

#: Blocks that divide none of the tiny Llama's dims (64, 32, 128, 256): every weight has partial blocks.
BLOCK = (24, 40)
SMALL = dict(decode_buckets=[1, 2], prefill_buckets=[64], max_seq_len=64)
QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 24]}


def hand_dequantized(values: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    out = torch.empty(values.shape, dtype=torch.float32)
    bn, bk = block
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * bn, (i + 1) * bn), slice(j * bk, (j + 1) * bk)
            out[rows, cols] = values[rows, cols].float() * scale[i, j]
    return out


def test_dequantize_equals_a_hand_reference_with_partial_blocks():
    weight = torch.randn(40, 56, generator=torch.Generator().manual_seed(0))
    values, scale = quantize_blocks(weight, (16, 24))
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (3, 3)
    assert torch.equal(dequantize(values, scale, (16, 24)), hand_dequantized(values, scale, (16, 24)))
    assert (dequantize(values, scale, (16, 24)) - weight).abs().max() <= weight.abs().max() / 16  # e4m3: 3 bits
    stacked = dequantize(torch.stack([values, values]), torch.stack([scale, 2 * scale]), (16, 24))
    assert torch.equal(stacked[1], 2 * stacked[0])  # expert dims: each its own scales


@pytest.fixture
def fp8_dir(tmp_path) -> Path:
    """A checkpoint of one fp8 matrix [40, 56] in 16 x 24 blocks, one fp8 expert stack, one bf16 norm."""
    generator = torch.Generator().manual_seed(1)
    values, scale = quantize_blocks(torch.randn(40, 56, generator=generator), (16, 24))
    experts = [quantize_blocks(torch.randn(40, 56, generator=generator), (16, 24)) for _ in range(3)]
    tensors = {
        "w.weight": values,
        "w.weight_scale_inv": scale,
        "experts.down_proj": torch.stack([v for v, _ in experts]),
        "experts.down_proj_scale_inv": torch.stack([s for _, s in experts]),
        "norm.weight": torch.ones(56, dtype=torch.bfloat16),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": QUANT}))
    return tmp_path


@pytest.mark.parametrize("name", ["w.weight", "experts.down_proj"])
def test_sharded_reads_equal_slices_of_the_whole(fp8_dir, name):
    """Block-aligned slices read their own rows/columns and scales; the others go through the whole tensor:
    both must give exactly the slice of the dequantized whole."""
    shape = (40, 56) if name == "w.weight" else (3, 40, 56)
    lead = len(shape) - 2
    with Checkpoint(fp8_dir, Fp8Blocks((16, 24))) as checkpoint:
        whole = checkpoint.load(name, shape, torch.float32)
        stored = load_file(fp8_dir / "model.safetensors")
        assert torch.equal(whole, dequantize(stored[name], stored[name + "_scale_inv"], (16, 24)))
        shards = [(lead, 16, 32), (lead, 32, 40), (lead, 8, 24), (lead + 1, 24, 48), (lead + 1, 48, 56)]
        shards += [(lead + 1, 10, 30), (lead, 0, 40)] + ([(0, 1, 3)] if lead else [])
        for dim, start, end in shards:
            index = (slice(None),) * dim + (slice(start, end),)
            assert torch.equal(checkpoint.load(name, shape, torch.float32, (dim, start, end)), whole[index])
        assert torch.equal(checkpoint.load(name, shape, torch.bfloat16), whole.to(torch.bfloat16))


def test_scales_are_not_model_tensors(fp8_dir):
    with Checkpoint(fp8_dir, Fp8Blocks((16, 24))) as checkpoint:
        assert sorted(checkpoint.names()) == ["experts.down_proj", "norm.weight", "w.weight"]
        assert "w.weight" in checkpoint and "w.weight_scale_inv" not in checkpoint
        assert checkpoint.load("norm.weight", (56,), torch.float32).dtype == torch.float32


def rewrite(model_dir: Path, edit) -> None:
    tensors = load_file(model_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(model_dir / "model.safetensors"))


@pytest.mark.parametrize(
    ("edit", "quantization", "fragments"),
    [
        (lambda t: t.pop("w.weight_scale_inv"), Fp8Blocks((16, 24)), ["'w.weight'", "'w.weight_scale_inv' is missing"]),
        (
            lambda t: t.update({"w.weight_scale_inv": torch.ones(3, 2)}),
            Fp8Blocks((16, 24)),
            ["'w.weight_scale_inv'", "[3, 2]", "expected [3, 3]"],
        ),
        (lambda t: None, Fp8Blocks((16, 16)), ["'w.weight_scale_inv'", "[3, 3]", "expected [3, 4]", "16x16"]),
        (lambda t: None, None, ["'w.weight'", "float8_e4m3fn", "no quantization_config"]),
        (
            lambda t: t.update({"w.weight": t["w.weight"].to(torch.float8_e5m2)}),
            Fp8Blocks((16, 24)),
            ["'w.weight'", "F8_E5M2"],
        ),
        (
            lambda t: t.update({"w.weight": t["w.weight"].float()}),
            Fp8Blocks((16, 24)),
            ["'w.weight'", "'w.weight_scale_inv'", "F32"],
        ),
    ],
    ids=[
        "scale-missing",
        "scale-wrong-shape",
        "block-mismatch",
        "no-quantization-config",
        "e5m2",
        "scale-on-float-weight",
    ],
)
def test_bad_fp8_tensors_are_named(fp8_dir, edit, quantization, fragments):
    rewrite(fp8_dir, edit)
    with Checkpoint(fp8_dir, quantization) as checkpoint, pytest.raises(CheckpointError) as error:
        checkpoint.load("w.weight", (40, 56), torch.float32)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("quant", "fragment"),
    [
        ({"quant_method": "bitsandbytes"}, "quantization_config quant_method 'bitsandbytes' is not supported"),
        ({**QUANT, "fmt": "e5m2"}, "fmt 'e5m2'"),
        ({**QUANT, "activation_scheme": "static"}, "activation_scheme 'static'"),
        ({**QUANT, "weight_block_size": [128]}, "weight_block_size"),
        ({**QUANT, "weight_block_size": [128, 0]}, "weight_block_size"),
        ({**QUANT, "weight_block_size": [128.0, 128]}, "weight_block_size"),
        ({**QUANT, "weight_block_size": None}, "weight_block_size"),
        ("fp8", "quantization_config must be an object"),
    ],
)
def test_unsupported_quantization_configs_are_refused_by_name(quant, fragment):
    with pytest.raises(CheckpointError, match=fragment.replace("[", r"\[")):
        checkpoint_quantization({"quantization_config": quant})


def test_plain_checkpoints_declare_no_quantization():
    assert checkpoint_quantization({}) is None
    assert checkpoint_quantization({"quantization_config": QUANT}) == Fp8Blocks((16, 24))


#: The architectures tested in fp8 (DeepSeek's published checkpoints are fp8 with yarn rope).
FP8_MODELS = {
    "LlamaForCausalLM": {},
    "DeepseekV3ForCausalLM": dict(
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        }
    ),
}


def fp8_and_dequantized(checkpoints, root: Path, architecture: str) -> tuple[Path, Path]:
    """A tiny checkpoint's fp8 copy in BLOCK blocks, and the plain checkpoint of its dequantized weights."""
    src, _ = checkpoints.checkpoint(architecture, **FP8_MODELS[architecture])
    state = quantize_checkpoint_to_fp8(src, root / "fp8", block=BLOCK)
    return root / "fp8", save_dequantized(src, root / "dequantized", state)


@pytest.fixture(scope="module")
def llama_fp8(checkpoints, tmp_path_factory) -> tuple[Path, Path]:
    return fp8_and_dequantized(checkpoints, tmp_path_factory.mktemp("fp8"), "LlamaForCausalLM")


def test_fp8_checkpoint_quantizes_every_projection(llama_fp8):
    stored = load_file(llama_fp8[0] / "model.safetensors")
    fp8_names = sorted(n for n, t in stored.items() if t.dtype == torch.float8_e4m3fn)
    assert len(fp8_names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert all(n + "_scale_inv" in stored for n in fp8_names)
    q = stored["model.layers.0.self_attn.q_proj.weight"]
    assert stored["model.layers.0.self_attn.q_proj.weight_scale_inv"].shape == (
        math.ceil(q.shape[0] / BLOCK[0]),
        math.ceil(q.shape[1] / BLOCK[1]),
    )


@pytest.mark.parametrize("architecture", sorted(FP8_MODELS))
def test_fp8_checkpoint_compiles_like_its_dequantized_weights_and_matches_transformers(
    checkpoints, tmp_path, architecture
):
    """The fp8 checkpoint and the plain one holding its dequantized weights give the same artifact logits
    exactly; transformers on the dequantized weights is the oracle (the parity tests' tolerance). DeepSeek
    also quantizes its per-expert tensors, each with its own scales, and keeps its router in bf16/fp32."""
    fp8_dir, plain_dir = fp8_and_dequantized(checkpoints, tmp_path, architecture)
    prompts = mixed_prompts(256)
    fp8_model = xllm_compiler.load(checkpoints.artifact(fp8_dir))
    plain_model = xllm_compiler.load(checkpoints.artifact(plain_dir))
    assert torch.equal(fp8_model.logits(prompts), plain_model.logits(prompts))
    check_parity(checkpoints, hf_in_float32(plain_dir, architecture), fp8_dir)


def test_compile_names_a_missing_scale_on_one_line(llama_fp8, tmp_path, capsys):
    model_dir = Path(shutil.copytree(llama_fp8[0], tmp_path / "model"))
    rewrite(model_dir, lambda t: t.pop("model.layers.1.mlp.down_proj.weight_scale_inv"))
    args = ["--decode-buckets", "1", "--prefill-buckets", "16", "--max-seq-len", "64", "--quiet"]
    rc, stdout, err = call(cli.main, [model_dir, tmp_path / "out", *args], capsys)
    assert rc == 2 and stdout == ""
    assert_one_line(err, "xllm-compile", "'model.layers.1.mlp.down_proj.weight'", "weight_scale_inv' is missing")


def test_compile_refuses_an_unknown_quantization_by_name(llama_fp8, tmp_path):
    model_dir = Path(shutil.copytree(llama_fp8[1], tmp_path / "model"))
    config = json.loads((model_dir / "config.json").read_text())
    quant = {"quant_method": "bitsandbytes"}
    (model_dir / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
    with pytest.raises(CheckpointError, match="quant_method 'bitsandbytes' is not supported"):
        xllm_compiler.compile(model_dir, tmp_path / "out", **SMALL)
