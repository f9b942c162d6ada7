"""Supported architectures, keyed by the ``architectures`` name in config.json.

All are one decoder family (RMSNorm, rotary, GQA attention, SwiGLU MLP); an entry says how the
family member differs: which projections carry a bias, whether q/k are normalised, whether it slides,
for the mixture-of-experts members how their MoE layers route, and for DeepSeek-V2/V3 the shape of
their multi-head latent attention (which replaces GQA).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xllm_compiler.errors import ConfigError
from xllm_compiler.models.config import (
    MLASpec,
    ModelSpec,
    MoESpec,
    RopeSpec,
    checkpoint_dtype,
    generation_eos,
    read_config,
    require,
    rope_spec,
    sliding_windows,
    token_ids,
)
from xllm_compiler.models.quantization import checkpoint_quantization
from xllm_compiler.models.rope import softmax_scale


@dataclass(frozen=True)
class Family:
    """How one architecture departs from Llama."""

    qkv_bias: Callable[[dict[str, Any]], bool]
    o_bias: Callable[[dict[str, Any]], bool]
    qk_norm: bool = False
    slides_everywhere: bool = False
    moe: Callable[[dict[str, Any], int], MoESpec] | None = None
    mla: Callable[[dict[str, Any], RopeSpec], MLASpec] | None = None


def _attention_bias(config: dict[str, Any]) -> bool:
    return bool(config.get("attention_bias", False))


def _never(config: dict[str, Any]) -> bool:
    return False


def _always(config: dict[str, Any]) -> bool:
    return True


def _qwen2_moe_qkv_bias(config: dict[str, Any]) -> bool:
    return bool(config.get("qkv_bias", True))  # transformers 4's configs have no key: always biased


def _num_experts(config: dict[str, Any]) -> int:
    """``num_experts`` (published Qwen checkpoints) or ``num_local_experts`` (Mixtral, transformers 5)."""
    key = "num_experts" if config.get("num_experts") is not None else "num_local_experts"
    return require(config, key)


def _routing(config: dict[str, Any], num_experts: int) -> int:
    top_k = require(config, "num_experts_per_tok")
    if top_k > num_experts:
        raise ConfigError(f"config.json num_experts_per_tok {top_k} is greater than the expert count {num_experts}")
    return top_k


def _qwen_moe(config: dict[str, Any], num_layers: int) -> MoESpec:
    """Qwen2/3-MoE: layer i routes unless in ``mlp_only_layers`` or (i + 1) is no multiple of
    ``decoder_sparse_step``; softmax top-k, renormalised when ``norm_topk_prob``."""
    num_experts = _num_experts(config)
    step = int(config.get("decoder_sparse_step") or 1)
    dense = set(config.get("mlp_only_layers") or ())
    return MoESpec(
        num_experts=num_experts,
        top_k=_routing(config, num_experts),
        expert_intermediate_size=require(config, "moe_intermediate_size"),
        sparse_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers)),
        renormalise=bool(config.get("norm_topk_prob", False)),
        weights_in_model_dtype=True,
        shared_expert_size=int(config.get("shared_expert_intermediate_size") or 0),
        module="mlp",
        expert_projections=("gate_proj", "up_proj", "down_proj"),
    )


def _mixtral_moe(config: dict[str, Any], num_layers: int) -> MoESpec:
    """Mixtral: every layer routes; softmax, top-k, always renormalised, weights kept in float32."""
    num_experts = _num_experts(config)
    return MoESpec(
        num_experts=num_experts,
        top_k=_routing(config, num_experts),
        expert_intermediate_size=require(config, "intermediate_size"),
        sparse_layers=(True,) * num_layers,
        renormalise=True,
        weights_in_model_dtype=False,
        shared_expert_size=0,
        module="block_sparse_moe",
        expert_projections=("w1", "w3", "w2"),
    )


def _deepseek_moe(config: dict[str, Any], num_layers: int) -> MoESpec:
    """DeepSeek-V3: layers from ``first_k_dense_replace`` on route; sigmoid scores plus
    ``e_score_correction_bias`` pick the ``topk_group`` best of ``n_group`` groups (each scored by its two
    best experts), then the top-k within them; the weights are the unbiased scores, renormalised when
    ``norm_topk_prob``, times ``routed_scaling_factor``; ``n_shared_experts`` always-on experts are added."""
    for key, supported in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if config.get(key, supported) != supported:
            raise ConfigError(f"config.json {key} '{config[key]}' is not supported (only '{supported}')")
    num_experts = require(config, "n_routed_experts")
    top_k = _routing(config, num_experts)
    groups = int(config.get("n_group") or 1)
    kept = int(config.get("topk_group") or groups)
    if num_experts % groups or num_experts // groups < 2:
        raise ConfigError(f"config.json n_group {groups} must divide n_routed_experts {num_experts} into groups of 2+")
    if not 0 < kept <= groups or top_k > kept * (num_experts // groups):
        raise ConfigError(f"config.json topk_group {kept} cannot give num_experts_per_tok {top_k} experts")
    size = require(config, "moe_intermediate_size")
    first_dense = int(config.get("first_k_dense_replace") or 0)
    return MoESpec(
        num_experts=num_experts,
        top_k=top_k,
        expert_intermediate_size=size,
        sparse_layers=tuple(i >= first_dense for i in range(num_layers)),
        renormalise=bool(config.get("norm_topk_prob", True)),
        weights_in_model_dtype=False,
        shared_expert_size=size * int(config.get("n_shared_experts") or 0),
        module="mlp",
        expert_projections=("gate_proj", "up_proj", "down_proj"),
        scoring="sigmoid",
        num_groups=groups,
        topk_groups=kept,
        routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
        router_in_float32=True,
        router_bias=True,
        shared_expert_gated=False,
        shared_module="shared_experts",
    )


def _deepseek_v2_moe(config: dict[str, Any], num_layers: int) -> MoESpec:
    """DeepSeek-V2: DeepSeek-V3's layout (dense layers first, shared experts, a float32 router) with softmax
    scores: ``topk_method`` 'greedy' takes the top-k of all experts, 'group_limited_greedy' of the
    ``topk_group`` groups with the best single score; weights not renormalised, times ``routed_scaling_factor``."""
    method = config.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise ConfigError(f"config.json topk_method '{method}' is not supported (greedy, group_limited_greedy)")
    v3 = {**config, "topk_method": "noaux_tc", "scoring_func": "sigmoid"}
    if method == "greedy":
        v3.update(n_group=1, topk_group=1)
    spec = _deepseek_moe(v3, num_layers)
    return dataclasses.replace(spec, scoring="group_softmax", renormalise=False, router_bias=False)


def _deepseek_mla(config: dict[str, Any], rope: RopeSpec) -> MLASpec:
    nope, rope_dim = require(config, "qk_nope_head_dim"), require(config, "qk_rope_head_dim")
    if rope_dim % 2:
        raise ConfigError(f"qk_rope_head_dim {rope_dim} must be even for rotary embeddings")
    return MLASpec(
        q_lora_rank=int(config.get("q_lora_rank") or 0),
        kv_lora_rank=require(config, "kv_lora_rank"),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=require(config, "v_head_dim"),
        softmax_scale=softmax_scale(rope, nope + rope_dim),
        rope_interleave=bool(config.get("rope_interleave", True)),
        attention_bias=_attention_bias(config),
    )


def _deepseek_v2_mla(config: dict[str, Any], rope: RopeSpec) -> MLASpec:
    """DeepSeek-V2's attention is V3's, its rotary always on interleaved pairs (a complex multiply)."""
    return _deepseek_mla({**config, "rope_interleave": True}, rope)


ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": Family(qkv_bias=_attention_bias, o_bias=_attention_bias),
    "MistralForCausalLM": Family(qkv_bias=_never, o_bias=_never, slides_everywhere=True),
    "Qwen2ForCausalLM": Family(qkv_bias=_always, o_bias=_never),
    "Qwen3ForCausalLM": Family(qkv_bias=_attention_bias, o_bias=_attention_bias, qk_norm=True),
    "Qwen2MoeForCausalLM": Family(qkv_bias=_qwen2_moe_qkv_bias, o_bias=_never, moe=_qwen_moe),
    "Qwen3MoeForCausalLM": Family(qkv_bias=_attention_bias, o_bias=_attention_bias, qk_norm=True, moe=_qwen_moe),
    "MixtralForCausalLM": Family(qkv_bias=_never, o_bias=_never, slides_everywhere=True, moe=_mixtral_moe),
    "DeepseekV2ForCausalLM": Family(
        qkv_bias=_never, o_bias=_attention_bias, moe=_deepseek_v2_moe, mla=_deepseek_v2_mla
    ),
    "DeepseekV3ForCausalLM": Family(qkv_bias=_never, o_bias=_attention_bias, moe=_deepseek_moe, mla=_deepseek_mla),
}


def architecture_of(config: dict[str, Any]) -> str:
    """The one supported architecture config.json names, or an error listing the supported ones."""
    names = config.get("architectures") or []
    supported = ", ".join(ARCHITECTURES)
    if not names:
        raise ConfigError(f"config.json names no 'architectures' (supported: {supported})")
    for name in names:
        if name in ARCHITECTURES:
            return name
    raise ConfigError(f"architecture {', '.join(map(str, names))} is not supported (supported: {supported})")


def load_spec(model_dir: Path) -> ModelSpec:
    """Read model_dir/config.json into a ModelSpec, refusing what we cannot run faithfully."""
    return spec_from_config(read_config(model_dir), generation_eos(model_dir))


def spec_from_config(config: dict[str, Any], eos_override: tuple[int, ...] | None = None) -> ModelSpec:
    """A ModelSpec from a config.json dict (``eos_override``: generation_config.json's eos ids)."""
    architecture = architecture_of(config)
    family = ARCHITECTURES[architecture]
    checkpoint_quantization(config)  # an unsupported quantization_config is refused before any weight is read
    act = config.get("hidden_act", config.get("hidden_activation", "silu"))
    if act != "silu":
        raise ConfigError(f"hidden_act '{act}' is not supported (only 'silu')")
    if config.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not supported")
    hidden = require(config, "hidden_size")
    heads = require(config, "num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    rope = rope_spec(config)
    mla = family.mla(config, rope) if family.mla else None
    if mla is not None:  # every head reads the one latent; the rope table is as wide as its rotary part
        kv_heads, head_dim = heads, mla.qk_rope_head_dim
    else:
        head_dim = config.get("head_dim") or hidden // heads
    if head_dim % 2:
        raise ConfigError(f"head_dim {head_dim} must be even for rotary embeddings")
    num_layers = require(config, "num_hidden_layers")
    eos = eos_override or token_ids(config.get("eos_token_id"))
    return ModelSpec(
        architecture=architecture,
        vocab_size=require(config, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=require(config, "intermediate_size"),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope=rope,
        max_position_embeddings=int(config.get("max_position_embeddings") or 2048),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias(config),
        o_bias=family.o_bias(config),
        qk_norm=family.qk_norm,
        sliding_windows=sliding_windows(config, num_layers, family.slides_everywhere),
        dtype=checkpoint_dtype(config),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=eos,
        moe=family.moe(config, num_layers) if family.moe else None,
        mla=mla,
    )
