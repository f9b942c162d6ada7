"""Write a Llama checkpoint as a GGUF file for llama.cpp, in F32, BF16, Q8_0 or Q4_0: bench.py's peer system.

    python tools/gguf_convert.py MODEL_DIR OUT.gguf [--type F32|BF16|Q8_0|Q4_0]

What llama.cpp's convert_hf_to_gguf.py writes for a LlamaForCausalLM, cut down to what a benchmark needs, so
that llama.cpp runs the very weights our compiler does:

  metadata  the llama architecture's hyper-parameters (context, embedding and feed-forward lengths, block and
            head counts, key/value length, rope base and dimensions, RMS eps, vocab size), the file type and a
            placeholder vocabulary: llama-bench and llama-batched-bench feed token ids, never text, so the
            tokenizer section is a SentencePiece-style list of vocab_size made-up pieces (<unk>, <s>, </s>,
            the 256 byte pieces where they fit, then t<id>) with bos 1 and eos 2.
  tensors   token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up,
            ffn_down}, output_norm and output (none when the embeddings are tied: llama.cpp then reads
            token_embd). Norms stay F32, as llama.cpp's converter keeps every 1-D tensor; every matrix, the
            embedding and the LM head included, takes the chosen type (for Q4_0 that is llama-quantize's
            --pure: its default would make the LM head Q6_K, which gguf-py cannot write).
  rotary    transformers' Llama rotates the two halves of each head (rotate_half); llama.cpp's llama graph
            rotates adjacent pairs. As convert_hf_to_gguf does, the rows of attn_q and attn_k are reordered per
            head (row j of the first half, then row j of the second half, for every j), which makes the two
            conventions compute the same attention scores.

Which of our variants each type stands beside (GGUF_TYPES): float32 F32, bfloat16 BF16, int8 Q8_0 (per 32
weights one float16 scale and 32 int8: 8.5 bits a weight), int4 Q4_0 (one float16 scale and 32 4-bit
values: 4.5 bits). The quantization is gguf-py's numpy port of ggml's reference quantizers (bit-exact for
Q8_0).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np
import torch

from xllm_compiler.errors import ConfigError, OptionsError
from xllm_compiler.models.config import ModelSpec
from xllm_compiler.models.registry import load_spec
from xllm_compiler.models.weights import Checkpoint

#: Our variant -> the GGUF type llama.cpp runs beside it.
GGUF_TYPES = {"float32": "F32", "bfloat16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}
FILE_TYPES = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0


def permute_for_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder a q/k projection's rows from rotate-half pairs (j, j + d/2) to adjacent pairs (2j, 2j + 1)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_for_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of ``permute_for_rope``: GGUF's attn_q/attn_k rows back in transformers' order."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama_spec(model_dir: Path) -> ModelSpec:
    """The checkpoint's spec, refused unless llama.cpp's plain llama graph computes the same model."""
    spec = load_spec(Path(model_dir))
    refusals = {
        f"architecture {spec.architecture} (only LlamaForCausalLM)": spec.architecture != "LlamaForCausalLM",
        "mixture-of-experts layers": spec.moe is not None,
        "latent attention": spec.mla is not None,
        f"rope type '{spec.rope.kind}' (only 'default')": spec.rope.kind != "default",
        "q/k/v or o projection biases": spec.qkv_bias or spec.o_bias,
        "q/k norms": spec.qk_norm,
        "sliding-window attention": any(spec.sliding_windows),
    }
    for what, refused in refusals.items():
        if refused:
            raise ConfigError(f"{model_dir}/config.json: GGUF conversion does not support {what}")
    return spec


def tensor_plan(spec: ModelSpec) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(checkpoint name, GGUF name, shape, heads to permute for rope or 0) of every tensor, in file order."""
    hidden, inter, head_dim = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q_rows, kv_rows = spec.num_heads * head_dim, spec.num_kv_heads * head_dim
    plan = [("model.embed_tokens.weight", "token_embd.weight", (spec.vocab_size, hidden), 0)]
    for i in range(spec.num_layers):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        plan += [
            (hf + "input_layernorm.weight", blk + "attn_norm.weight", (hidden,), 0),
            (hf + "self_attn.q_proj.weight", blk + "attn_q.weight", (q_rows, hidden), spec.num_heads),
            (hf + "self_attn.k_proj.weight", blk + "attn_k.weight", (kv_rows, hidden), spec.num_kv_heads),
            (hf + "self_attn.v_proj.weight", blk + "attn_v.weight", (kv_rows, hidden), 0),
            (hf + "self_attn.o_proj.weight", blk + "attn_output.weight", (hidden, q_rows), 0),
            (hf + "post_attention_layernorm.weight", blk + "ffn_norm.weight", (hidden,), 0),
            (hf + "mlp.gate_proj.weight", blk + "ffn_gate.weight", (inter, hidden), 0),
            (hf + "mlp.up_proj.weight", blk + "ffn_up.weight", (inter, hidden), 0),
            (hf + "mlp.down_proj.weight", blk + "ffn_down.weight", (hidden, inter), 0),
        ]
    plan.append(("model.norm.weight", "output_norm.weight", (hidden,), 0))
    if not spec.tie_word_embeddings:
        plan.append(("lm_head.weight", "output.weight", (spec.vocab_size, hidden), 0))
    return plan


def placeholder_vocab(size: int) -> tuple[list[str], list[int]]:
    """``size`` distinct pieces and their token types: <unk>, <s>, </s>, the byte pieces if they fit, t<id>."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    if size >= len(tokens) + 256:
        tokens += [f"<0x{byte:02X}>" for byte in range(256)]
        types += [gguf.TokenType.BYTE] * 256
    tokens += [f"t{i}" for i in range(len(tokens), size)]
    types += [gguf.TokenType.NORMAL] * (size - len(types))
    return tokens[:size], [int(t) for t in types[:size]]


def encode(name: str, weight: np.ndarray, gguf_type: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """``weight`` (float32) in ``gguf_type``, or in F32 for a 1-D tensor; the block types need whole rows of
    blocks (32 values)."""
    qtype = gguf.GGMLQuantizationType[gguf_type] if weight.ndim > 1 else gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F32:
        return weight, qtype
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if weight.shape[-1] % block:
        raise OptionsError(f"tensor '{name}': rows of {weight.shape[-1]} values do not split into {gguf_type} blocks")
    return gguf.quants.quantize(weight, qtype), qtype


def convert(model_dir: Path, out: Path, gguf_type: str = "F32") -> Path:
    """Write ``model_dir``'s checkpoint to ``out`` as a llama GGUF file with matrices in ``gguf_type``."""
    if gguf_type not in FILE_TYPES:
        raise OptionsError(f"GGUF type '{gguf_type}' is not one of {', '.join(FILE_TYPES)}")
    spec = llama_spec(model_dir)
    writer = gguf.GGUFWriter(str(out), "llama", use_temp_file=True)  # tensors spill to disk, not RAM
    writer.add_name(Path(model_dir).name)
    writer.add_context_length(spec.max_position_embeddings)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(spec.rope.theta)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_vocab_size(spec.vocab_size)
    writer.add_file_type(FILE_TYPES[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types = placeholder_vocab(spec.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    with Checkpoint(Path(model_dir)) as checkpoint:
        for hf_name, name, shape, heads in tensor_plan(spec):
            weight = checkpoint.load(hf_name, shape, torch.float32).numpy()
            if heads:
                weight = permute_for_rope(weight, heads)
            data, qtype = encode(name, np.ascontiguousarray(weight), gguf_type)
            writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out)


def bytes_per_step(path: Path) -> int:
    """Weight bytes a batch-1 decode step of the GGUF model reads: every tensor, but one row of token_embd
    unless it is also the LM head (no output tensor)."""
    tensors = gguf.GGUFReader(str(path)).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    total = 0
    for tensor in tensors:
        rows = int(np.prod(tensor.shape[1:])) if tensor.name == "token_embd.weight" and not tied else 1
        total += int(tensor.n_bytes) // rows
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--type", choices=list(FILE_TYPES), default="F32", help="matrix type (default %(default)s)")
    args = parser.parse_args()
    path = convert(args.model_dir, args.out, args.type)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
