"""tools/gguf_convert.py: a tiny random Llama written as GGUF and read back with gguf-py's reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf")

from tools.gguf_convert import (  # noqa: E402 (after the importorskip)
    bytes_per_step,
    convert,
    permute_for_rope,
    placeholder_vocab,
    unpermute_for_rope,
)
from tools.random_checkpoint import write_checkpoint  # noqa: E402
from xllm_compiler.errors import ConfigError  # noqa: E402

# 300 tokens: room for the 256 byte pieces; rows of 64 and 96 values: whole 32-value blocks.
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16  # the preset's num_key_value_heads is 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "model", "llama-100m", **TINY)


@pytest.fixture(scope="module")
def weights(checkpoint):
    return {name: tensor.float().numpy() for name, tensor in load_file(checkpoint / "model.safetensors").items()}


@pytest.fixture(scope="module")
def paths(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {t: convert(checkpoint, out / f"{t}.gguf", t) for t in ("F32", "BF16", "Q8_0", "Q4_0")}


@pytest.fixture(scope="module")
def files(paths):
    return {t: gguf.GGUFReader(str(path)) for t, path in paths.items()}


def field(reader, key: str):
    return reader.get_field(key).contents()


def tensors(reader) -> dict:
    return {tensor.name: tensor for tensor in reader.tensors}


def hf_weight(weights: dict, name: str) -> np.ndarray:
    """The checkpoint tensor a GGUF tensor came from, with the q/k rows in GGUF's (rope-permuted) order."""
    block, _, rest = name.removeprefix("blk.").partition(".")
    hf = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }.get(name)
    if hf is None:
        part = {
            "attn_norm.weight": "input_layernorm",
            "attn_q.weight": "self_attn.q_proj",
            "attn_k.weight": "self_attn.k_proj",
            "attn_v.weight": "self_attn.v_proj",
            "attn_output.weight": "self_attn.o_proj",
            "ffn_norm.weight": "post_attention_layernorm",
            "ffn_gate.weight": "mlp.gate_proj",
            "ffn_up.weight": "mlp.up_proj",
            "ffn_down.weight": "mlp.down_proj",
        }[rest]
        hf = f"model.layers.{block}.{part}.weight"
    weight = weights[hf]
    if name.endswith("attn_q.weight"):
        return permute_for_rope(weight, HEADS)
    if name.endswith("attn_k.weight"):
        return permute_for_rope(weight, KV_HEADS)
    return weight


def test_the_llama_metadata_and_a_placeholder_vocab_are_written(files):
    reader = files["Q4_0"]
    expected = {
        "general.architecture": "llama",
        "llama.context_length": 2048,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 96,
        "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": KV_HEADS,
        "llama.attention.key_length": HEAD_DIM,
        "llama.rope.dimension_count": HEAD_DIM,
        "llama.rope.freq_base": 10000.0,
        "llama.vocab_size": 300,
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q4_0),
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    assert {key: field(reader, key) for key in expected} == expected
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == len(set(tokens)) == 300 and tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert field(reader, "tokenizer.ggml.token_type")[258:260] == [gguf.TokenType.BYTE, gguf.TokenType.NORMAL]
    assert placeholder_vocab(5) == (["<unk>", "<s>", "</s>", "t3", "t4"], [2, 3, 3, 1, 1])  # no room for bytes


@pytest.mark.parametrize("gguf_type", ["F32", "BF16", "Q8_0", "Q4_0"])
def test_tensor_names_shapes_and_types(files, weights, gguf_type):
    found = tensors(files[gguf_type])
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    names = {f"blk.{i}.{part}.weight" for i in range(2) for part in per_block}
    assert set(found) == names | {"token_embd.weight", "output_norm.weight", "output.weight"}
    for name, tensor in found.items():
        shape = hf_weight(weights, name).shape
        assert list(tensor.shape) == list(reversed(shape)), name  # ggml lists the row length first
        expected = "F32" if len(shape) == 1 else gguf_type  # norms stay F32
        assert tensor.tensor_type.name == expected, name


def test_f32_tensors_are_the_weights_with_q_and_k_rows_permuted_for_rope(files, weights):
    for name, tensor in tensors(files["F32"]).items():
        np.testing.assert_array_equal(tensor.data.reshape(hf_weight(weights, name).shape), hf_weight(weights, name))
    q = tensors(files["F32"])["blk.1.attn_q.weight"].data
    np.testing.assert_array_equal(unpermute_for_rope(q, HEADS), weights["model.layers.1.self_attn.q_proj.weight"])


def test_bf16_tensors_round_like_torch(files, weights):
    for name, tensor in tensors(files["BF16"]).items():
        expected = torch.from_numpy(hf_weight(weights, name)).bfloat16().float().numpy()
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(expected.shape)
        np.testing.assert_array_equal(values, expected)


@pytest.mark.parametrize(("gguf_type", "steps"), [("Q8_0", 254), ("Q4_0", 8)])
def test_block_types_dequantize_within_their_bound(files, weights, gguf_type, steps):
    """Q8_0: scale = max|w| / 127 per 32 weights, so an error of at most half a step, max|w| / 254. Q4_0: scale
    = w_max / -8 for the weight of largest magnitude; the other sign reaches only 7 steps, so up to one step,
    max|w| / 8 (clipped). Both plus the float16 rounding of the scale (2**-11 of at most 127 or 8 steps)."""
    for name, tensor in tensors(files[gguf_type]).items():
        weight = hf_weight(weights, name)
        if weight.ndim == 1:
            continue
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape)
        blocks = np.abs(weight).reshape(-1, 32).max(axis=1, keepdims=True)
        error = np.abs(values - weight).reshape(-1, 32)
        assert (error <= blocks * (1 / steps + 2**-10)).all(), name
        assert error.max() > 0, name  # really quantized


def test_permuted_rows_make_adjacent_pair_rope_score_like_rotate_half():
    """The reason for the permutation: llama.cpp rotates pairs (2j, 2j+1), transformers pairs (j, j + d/2)."""
    generator = torch.Generator().manual_seed(0)
    heads, dim, hidden, positions = 2, 8, 16, torch.arange(5.0)
    wq, wk, x = (torch.randn(n, hidden, generator=generator) for n in (heads * dim, heads * dim, 5))
    angles = positions[:, None] / 10000.0 ** (torch.arange(0, dim, 2) / dim)  # [tokens, dim / 2]
    cos, sin = angles.cos(), angles.sin()

    def rotate_half(v):  # [tokens, heads, dim]
        a, b = v[..., : dim // 2], v[..., dim // 2 :]
        return torch.cat([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]], -1)

    def rotate_pairs(v):
        a, b = v[..., 0::2], v[..., 1::2]
        return torch.stack([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]], -1).flatten(-2)

    def scores(wq, wk, rope):
        q, k = (rope((x @ w.T).view(5, heads, dim)) for w in (wq, wk))
        return torch.einsum("thd,shd->hts", q, k)

    gq, gk = (torch.from_numpy(permute_for_rope(w.numpy(), heads)) for w in (wq, wk))
    torch.testing.assert_close(scores(gq, gk, rotate_pairs), scores(wq, wk, rotate_half))
    assert not torch.allclose(scores(wq, wk, rotate_pairs), scores(wq, wk, rotate_half))


def test_bytes_per_step_reads_one_embedding_row(paths, files):
    found = tensors(files["Q8_0"])
    total = sum(int(t.n_bytes) for t in found.values())
    row = found["token_embd.weight"].n_bytes // 300
    assert bytes_per_step(paths["Q8_0"]) == total - found["token_embd.weight"].n_bytes + row


def test_models_llama_cpp_would_compute_differently_are_refused(tmp_path):
    moe = write_checkpoint(tmp_path / "moe", "mixtral-100m", **TINY)
    with pytest.raises(ConfigError, match="MixtralForCausalLM"):
        convert(moe, tmp_path / "moe.gguf")
    scaled = write_checkpoint(
        tmp_path / "scaled", "llama-100m", **TINY, rope_scaling={"rope_type": "linear", "factor": 2.0}
    )
    with pytest.raises(ConfigError, match="rope type 'linear'"):
        convert(scaled, tmp_path / "scaled.gguf")
