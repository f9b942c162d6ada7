"""Write a random-weight Hugging Face style checkpoint (config.json + model.safetensors) for benchmarks.

    python tools/random_checkpoint.py OUT_DIR [--preset llama-100m] [--dtype bfloat16] [--layers N]

Presets describe the shapes the benchmarks use; weights are normal(0, 0.02), norms one. No
transformers needed: the config is written in the transformers 4 key style.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

PRESETS: dict[str, dict] = {
    # ~100M parameters, Llama/Qwen2-shaped: the model the benchmarks and issue targets use.
    "llama-100m": dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    ),
    # ~110M parameters in all (~40M read per token: attention, router and 2 of 8 experts), Mixtral-shaped.
    "mixtral-100m": dict(
        architectures=["MixtralForCausalLM"],
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=2048,
    ),
    # ~96M parameters in all (~45M read per token), DeepSeek-V3-shaped: multi-head latent attention (q and kv
    # low-rank, a 256 + 32 wide latent cached per token), one dense layer then 5 of sigmoid-routed experts
    # (4 of 24 in the 2 best of 4 groups, plus one shared expert), yarn rope as DeepSeek's configs have it.
    "deepseek": dict(
        architectures=["DeepseekV3ForCausalLM"],
        model_type="deepseek_v3",
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=16,
        num_key_value_heads=16,
        q_lora_rank=384,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        rope_interleave=True,
        attention_bias=False,
        first_k_dense_replace=1,
        n_routed_experts=24,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        moe_intermediate_size=256,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        max_position_embeddings=2048,
        rope_scaling=dict(
            type="yarn",
            factor=4.0,
            original_max_position_embeddings=512,
            beta_fast=32,
            beta_slow=1,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
    ),
}
COMMON = dict(
    hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2
)


def random_weights(config: dict, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if "kv_lora_rank" in config:
        return _deepseek_weights(config, dtype, generator)
    hidden = config["hidden_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(dtype)

    weights = {"model.embed_tokens.weight": normal(config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype),
            p + "self_attn.q_proj.weight": normal(hidden, hidden),
            p + "self_attn.k_proj.weight": normal(kv, hidden),
            p + "self_attn.v_proj.weight": normal(kv, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype),
        }
        weights |= _mlp(config, p, normal)
    weights["model.norm.weight"] = torch.ones(hidden, dtype=dtype)
    weights["lm_head.weight"] = normal(config["vocab_size"], hidden)
    return weights


def _mlp(config: dict, prefix: str, normal) -> dict[str, torch.Tensor]:
    """A layer's dense MLP, or with ``num_local_experts`` its Mixtral router and per-expert w1/w3/w2."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    experts = config.get("num_local_experts")
    if not experts:
        return _swiglu(prefix + "mlp.", hidden, inter, normal)
    moe = prefix + "block_sparse_moe."
    weights = {moe + "gate.weight": normal(experts, hidden)}
    for e in range(experts):
        weights |= {
            f"{moe}experts.{e}.w1.weight": normal(inter, hidden),
            f"{moe}experts.{e}.w3.weight": normal(inter, hidden),
            f"{moe}experts.{e}.w2.weight": normal(hidden, inter),
        }
    return weights


def _deepseek_weights(config: dict, dtype: torch.dtype, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """DeepSeek-V3's tensors under its published names, experts one by one. The router is spread wider than
    the other weights (normal(0, 0.1)) and its ``e_score_correction_bias`` is small and random, so that
    tokens pick different experts and groups, as in a trained model, rather than ties broken by index."""

    def normal(*shape: int, std: float = 0.02, as_dtype: torch.dtype = dtype) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * std).to(as_dtype)

    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    q_lora, kv_lora, rope = config["q_lora_rank"], config["kv_lora_rank"], config["qk_rope_head_dim"]
    nope, value = config["qk_nope_head_dim"], config["v_head_dim"]
    experts, size = config["n_routed_experts"], config["moe_intermediate_size"]
    shared = size * config["n_shared_experts"]
    weights = {"model.embed_tokens.weight": normal(config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype),
            p + "self_attn.q_a_proj.weight": normal(q_lora, hidden),
            p + "self_attn.q_a_layernorm.weight": torch.ones(q_lora, dtype=dtype),
            p + "self_attn.q_b_proj.weight": normal(heads * (nope + rope), q_lora),
            p + "self_attn.kv_a_proj_with_mqa.weight": normal(kv_lora + rope, hidden),
            p + "self_attn.kv_a_layernorm.weight": torch.ones(kv_lora, dtype=dtype),
            p + "self_attn.kv_b_proj.weight": normal(heads * (nope + value), kv_lora),
            p + "self_attn.o_proj.weight": normal(hidden, heads * value),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype),
        }
        mlp = p + "mlp."
        if i < config["first_k_dense_replace"]:
            weights |= _swiglu(mlp, hidden, config["intermediate_size"], normal)
            continue
        weights[mlp + "gate.weight"] = normal(experts, hidden, std=0.1)
        weights[mlp + "gate.e_score_correction_bias"] = normal(experts, std=0.05, as_dtype=torch.float32)
        for e in range(experts):
            weights |= _swiglu(f"{mlp}experts.{e}.", hidden, size, normal)
        weights |= _swiglu(mlp + "shared_experts.", hidden, shared, normal)
    weights["model.norm.weight"] = torch.ones(hidden, dtype=dtype)
    weights["lm_head.weight"] = normal(config["vocab_size"], hidden)
    return weights


def _swiglu(prefix: str, hidden: int, inter: int, normal) -> dict[str, torch.Tensor]:
    return {
        prefix + "gate_proj.weight": normal(inter, hidden),
        prefix + "up_proj.weight": normal(inter, hidden),
        prefix + "down_proj.weight": normal(hidden, inter),
    }


def write_checkpoint(out: Path, preset: str = "llama-100m", dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Write the checkpoint; ``overrides`` change config keys (e.g. num_hidden_layers=32)."""
    config = {**PRESETS[preset], **COMMON, **overrides, "torch_dtype": str(dtype).removeprefix("torch.")}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(random_weights(config, dtype), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-100m")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--layers", type=int, help="override num_hidden_layers")
    args = parser.parse_args()
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    path = write_checkpoint(args.out, args.preset, getattr(torch, args.dtype), **overrides)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
