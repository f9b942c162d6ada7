"""Regenerate tools/tiny-llama: a tiny Llama checkpoint with a trained BPE tokenizer.

    python tools/make_tiny_model.py [--out tools/tiny-llama] [--seed 0] [--train-steps 300]

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on corpus.txt (beside the
output). The weights start random (normal, std 0.02; norms at one) and are then trained for a few
hundred steps on the same corpus, so that the demo prints words rather than byte soup (the model
memorises its 3 KB corpus; it knows nothing else). ``--train-steps 0`` keeps the random weights and
needs no transformers; training uses transformers' Llama (the test extra) and takes about a minute
on 2 cores. Written as safetensors with a transformers-4-style config.json. Deterministic for a seed
on one machine (thread counts can change the last bits of trained weights).
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


def sentence_starts(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[int]]:
    """The corpus as token ids (no bos), and the index where each sentence begins, so that training
    windows look like prompts: bos, then the start of a sentence."""
    ids: list[int] = []
    starts: list[int] = []
    for sentence in text.replace("\n", " ").split(". "):
        if sentence.strip():
            starts.append(len(ids))
            ids += tokenizer.encode(sentence.strip() + ". ", add_special_tokens=False).ids
    return ids, starts


def train(weights: dict[str, torch.Tensor], config: dict, corpus: tuple[list[int], list[int]], steps: int, seed: int):
    """A few hundred AdamW steps of next-token prediction on bos + sentence-initial windows, in place."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    model = LlamaForCausalLM(hf_config)
    model.load_state_dict(weights, strict=True)
    generator = torch.Generator().manual_seed(seed)
    token_ids, sentence_begins = corpus
    data = torch.tensor(token_ids + token_ids)  # wraps around, so every sentence has a full window
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    window, batch, bos = 64, 16, config["bos_token_id"]
    model.train()
    for _ in range(steps):
        picks = torch.randint(0, len(sentence_begins), (batch,), generator=generator).tolist()
        rows = [
            torch.cat([torch.tensor([bos]), data[sentence_begins[p] : sentence_begins[p] + window - 1]]) for p in picks
        ]
        inputs = torch.stack(rows)
        loss = model(input_ids=inputs, labels=inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"trained {steps} steps, final loss {loss.item():.3f}")
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            weights[name] = tensor.detach().clone().contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "tiny-llama")
    parser.add_argument("--corpus", type=Path, default=HERE / "tiny-llama" / "corpus.txt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-steps", type=int, default=300, help="0 keeps the random weights")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(args.corpus, CONFIG["vocab_size"])
    tokenizer.save(str(args.out / "tokenizer.json"))
    (args.out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": 2}
    (args.out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    weights = random_weights(CONFIG, args.seed)
    if args.train_steps > 0:
        train(weights, CONFIG, sentence_starts(tokenizer, args.corpus.read_text()), args.train_steps, args.seed)
    save_file(weights, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    print(f"wrote {args.out}: vocab {tokenizer.get_vocab_size()}, {CONFIG['num_hidden_layers']} layers")


if __name__ == "__main__":
    main()
