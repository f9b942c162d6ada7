"""Regenerate tools/tiny-llama: a tiny random-weight Llama checkpoint with a trained BPE tokenizer.

    python tools/make_tiny_model.py [--out tools/tiny-llama] [--seed 0]

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on corpus.txt (beside the
output); the weights are random (normal, std 0.02; norms at one), written as safetensors with a
transformers-4-style config.json. Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = Path(__file__).resolve().parent
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Llama checkpoints
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def train_tokenizer(corpus: Path, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(corpus)], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer


def random_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.02

    weights = {"model.embed_tokens.weight": normal(config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        weights.update(
            {
                prefix + "input_layernorm.weight": torch.ones(hidden),
                prefix + "self_attn.q_proj.weight": normal(hidden, hidden),
                prefix + "self_attn.k_proj.weight": normal(kv, hidden),
                prefix + "self_attn.v_proj.weight": normal(kv, hidden),
                prefix + "self_attn.o_proj.weight": normal(hidden, hidden),
                prefix + "post_attention_layernorm.weight": torch.ones(hidden),
                prefix + "mlp.gate_proj.weight": normal(inter, hidden),
                prefix + "mlp.up_proj.weight": normal(inter, hidden),
                prefix + "mlp.down_proj.weight": normal(hidden, inter),
            }
        )
    weights["model.norm.weight"] = torch.ones(hidden)
    weights["lm_head.weight"] = normal(config["vocab_size"], hidden)
    return weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "tiny-llama")
    parser.add_argument("--corpus", type=Path, default=HERE / "tiny-llama" / "corpus.txt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(args.corpus, CONFIG["vocab_size"])
    tokenizer.save(str(args.out / "tokenizer.json"))
    (args.out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": 2}
    (args.out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(random_weights(CONFIG, args.seed), str(args.out / "model.safetensors"), metadata={"format": "pt"})
    print(f"wrote {args.out}: vocab {tokenizer.get_vocab_size()}, {CONFIG['num_hidden_layers']} layers")


if __name__ == "__main__":
    main()
