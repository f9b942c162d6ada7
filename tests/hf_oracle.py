"""Tiny random checkpoints built with transformers, and transformers' own answers for them (the oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import xllm_compiler

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

#: One entry per supported architecture, with the departures from Llama its tests should exercise.
ARCHITECTURE_CONFIGS = {
    "LlamaForCausalLM": dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    ),
    "MistralForCausalLM": dict(sliding_window=16),
    "Qwen2ForCausalLM": dict(),
    "Qwen3ForCausalLM": dict(head_dim=32),
}
#: The mixture-of-experts architectures, kept apart: tests over ARCHITECTURE_CONFIGS count dense-model ops.
MOE_ARCHITECTURE_CONFIGS = {
    "Qwen3MoeForCausalLM": dict(
        hidden_size=32, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32
    ),
    "Qwen2MoeForCausalLM": dict(
        hidden_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
    ),
    "MixtralForCausalLM": dict(hidden_size=32, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
}
#: DeepSeek-V3 (latent attention, grouped sigmoid routing), kept apart from MOE_ARCHITECTURE_CONFIGS, whose
#: tests assume softmax routing: 8 experts in 4 groups of which 2 are kept, a dense first layer, a shared expert.
DEEPSEEK_CONFIGS = {
    "DeepseekV3ForCausalLM": dict(
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        routed_scaling_factor=2.5,
    ),
}
#: DeepSeek-V2: the same latent attention, softmax routing (``topk_method`` greedy or group_limited_greedy).
DEEPSEEK_CONFIGS["DeepseekV2ForCausalLM"] = {**DEEPSEEK_CONFIGS["DeepseekV3ForCausalLM"], "topk_method": "greedy"}


def hf_classes(architecture: str):
    import transformers

    model_cls = getattr(transformers, architecture)
    config_cls = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    return config_cls, model_cls


def make_hf_model(architecture: str, seed: int = 0, **overrides):
    """A random transformers model of ``architecture`` (float32), deterministic for ``seed``."""
    config_cls, model_cls = hf_classes(architecture)
    family = {**ARCHITECTURE_CONFIGS, **MOE_ARCHITECTURE_CONFIGS, **DEEPSEEK_CONFIGS}.get(architecture, {})
    config = config_cls(**{**TINY, **family, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Random, not HF's small init, so that norms and biases matter to the comparison.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            elif name.endswith(("mlp.gate.weight", "experts.gate_up_proj", "experts.down_proj")):
                param.normal_(0.0, 0.2)  # HF leaves routers at zero and experts unset: random, well-spread routing
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek's routing bias: a buffer, zero in HF's init
                buffer.normal_(0.0, 0.1)
    return model


def hf_in_float32(model_dir: Path, architecture: str):
    """The checkpoint in ``model_dir`` loaded by transformers in float32: the oracle for an artifact
    compiled at float32 from a bf16 checkpoint. Not ``model.float()`` of the bf16 model, whose rotary
    ``inv_freq`` buffer stays rounded to bf16 (a 4e-4 difference in Qwen3's logits): loading computes it
    afresh, as our compile does."""
    _, model_cls = hf_classes(architecture)
    return model_cls.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_last_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    """float32 logits at the last position of each prompt, each run alone (no padding involved)."""
    with torch.no_grad():
        return torch.stack([model(torch.tensor([p])).logits[0, -1].float() for p in prompts])


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy generate(), eos ignored, new tokens only."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def mixed_prompts(vocab_size: int, lengths=(5, 1, 23, 40), seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]


class TinyCheckpoints:
    """Session cache of saved checkpoints and compiled artifacts, keyed by what built them."""

    def __init__(self, root: Path):
        self.root = root
        self._models: dict[str, tuple[Path, object]] = {}
        self._artifacts: dict[str, Path] = {}

    def checkpoint(self, architecture: str, dtype: str = "float32", max_shard_size=None, **overrides):
        """(model_dir, hf_model) for a tiny checkpoint saved in ``dtype``; the hf model is in that dtype too."""
        key = json.dumps([architecture, dtype, max_shard_size, overrides], sort_keys=True, default=str)
        if key not in self._models:
            model = make_hf_model(architecture, **overrides).to(getattr(torch, dtype))
            path = self.root / f"ckpt{len(self._models)}"
            kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
            model.save_pretrained(path, **kwargs)
            self._models[key] = (path, model)
        return self._models[key]

    def artifact(self, model_dir: Path, **options) -> Path:
        key = json.dumps([str(model_dir), options], sort_keys=True, default=str)
        if key not in self._artifacts:
            out = self.root / f"artifact{len(self._artifacts)}"
            xllm_compiler.compile(model_dir, out, **options)
            self._artifacts[key] = out
        return self._artifacts[key]
