"""ModelSpec: the few numbers our decoder needs, read from a Hugging Face config.json.

Both key styles are read: transformers 4 (``rope_theta``, ``rope_scaling``, ``torch_dtype``) as found on
most published checkpoints, and transformers 5 (``rope_parameters``, ``dtype``). Anything we would
silently get wrong (another activation, partial rotary, an unknown rope type) is refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xllm_compiler.dtypes import MODEL_DTYPES
from xllm_compiler.errors import ConfigError
from xllm_compiler.interface import KV_PLANES, LATENT_PLANES

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters; ``kind`` is one of ROPE_TYPES."""

    theta: float
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # yarn, as config.json gives them (rope.py derives the cos/sin and softmax scales from them)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True  # round the correction range out to whole dimensions
    attention_factor: float | None = None  # cos/sin scale; None: derived from factor, mscale, mscale_all_dim
    mscale: float | None = None
    mscale_all_dim: float | None = None  # any non-default type: DeepSeek's softmax scale correction


@dataclass(frozen=True)
class MoESpec:
    """The mixture-of-experts layers of a checkpoint: which layers route, and how."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    sparse_layers: tuple[bool, ...]  # per layer: routed experts (True) or the dense MLP
    renormalise: bool  # top-k weights rescaled to sum to one (norm_topk_prob; Mixtral always)
    weights_in_model_dtype: bool  # Qwen casts the top-k weights back to the model dtype, Mixtral keeps float32
    shared_expert_size: int  # Qwen2-MoE's sigmoid-gated shared expert; 0: none
    module: str  # the checkpoint's name for the MoE block: 'mlp' or 'block_sparse_moe'
    expert_projections: tuple[str, str, str]  # per-expert tensor names: gate, up, down
    # DeepSeek-V3's router: sigmoid scores, a bias for the choice only, groups of experts, scaled weights.
    # 'softmax' (Qwen, Mixtral), 'sigmoid' (DeepSeek-V3: bias-steered groups), 'group_softmax' (DeepSeek-V2)
    scoring: str = "softmax"
    num_groups: int = 1  # n_group: experts are chosen from the topk_groups best groups only
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    router_in_float32: bool = False  # DeepSeek keeps the router weight (and its bias) in float32
    router_bias: bool = False  # DeepSeek-V3's e_score_correction_bias
    shared_expert_gated: bool = True  # Qwen2-MoE gates its shared expert by a sigmoid; DeepSeek adds it as is
    shared_module: str = "shared_expert"  # the checkpoint's name: 'shared_expert' or 'shared_experts'


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values come from one compressed latent per
    token, which is what the KV cache stores (``kv_lora_rank`` + ``qk_rope_head_dim`` values)."""

    q_lora_rank: int  # 0: a plain q_proj; else q_a_proj -> q_a_layernorm -> q_b_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    softmax_scale: float  # qk_head_dim ** -0.5, with yarn's mscale correction where the rope asks for it
    rope_interleave: bool  # rope dims stored as interleaved pairs: de-interleaved at load (models/build.py)
    attention_bias: bool

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values per token per layer in the cache: the latent and the shared rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelSpec:
    """Everything the flat decoder needs to know about one checkpoint's architecture."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeSpec
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int, ...]  # per layer; 0 is full attention
    dtype: torch.dtype | None  # the checkpoint's own dtype, when config.json says
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    moe: MoESpec | None = None
    mla: MLASpec | None = None  # None: grouped-query attention over expanded K/V


def kv_cache_geometry(spec: ModelSpec, tp: int = 1) -> tuple[int, int, int]:
    """(planes, heads, values per head) of each layer's cache on one of ``tp`` ranks: K and V of this
    rank's KV heads, or MLA's one latent row per token (replicated: every rank's heads read all of it)."""
    if spec.mla is not None:
        return LATENT_PLANES, 1, spec.mla.latent_dim
    return KV_PLANES, spec.num_kv_heads // tp, spec.head_dim


def expanded_kv_width(spec: ModelSpec, tp: int = 1) -> int:
    """Values per token per layer that K and V would take expanded, per rank: what MLA's latent saves."""
    if spec.mla is not None:
        return (spec.num_heads // tp) * (spec.mla.qk_head_dim + spec.mla.v_head_dim)
    return 2 * (spec.num_kv_heads // tp) * spec.head_dim


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json as a dict, with a clear error when it is missing or not JSON."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise ConfigError(f"model directory {model_dir} does not exist")
    if not path.is_file():
        raise ConfigError(f"{path} not found: a Hugging Face checkpoint needs a config.json")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return config


def require(config: dict[str, Any], key: str, kind: type = int) -> Any:
    """config[key], checked for presence and type (an int where a number is needed is fine)."""
    if key not in config or config[key] is None:
        raise ConfigError(f"config.json lacks '{key}'")
    value = config[key]
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or (kind is int and value <= 0):
        raise ConfigError(f"config.json '{key}' must be a positive {kind.__name__}, got {value!r}")
    return value


def checkpoint_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """The dtype a checkpoint declares: ``dtype`` (transformers 5) or ``torch_dtype`` (transformers 4)."""
    name = config.get("dtype") or config.get("torch_dtype")
    if name is None or name == "auto":
        return None
    if name not in MODEL_DTYPES:
        raise ConfigError(f"config.json dtype '{name}' is not one of {', '.join(MODEL_DTYPES)}")
    return MODEL_DTYPES[name]


def rope_spec(config: dict[str, Any]) -> RopeSpec:
    """Rope parameters from ``rope_parameters`` (v5) or ``rope_theta`` + ``rope_scaling`` (v4).

    yarn reads its keys as transformers does: ``original_max_position_embeddings`` from the top level of
    config.json first (Phi-3 keeps it there), then the rope parameters, then ``max_position_embeddings``;
    a ``factor`` of null is the ratio max_position_embeddings / original (DeepSeek), an absent one an error.
    """
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"rope type '{kind}' is not supported (supported: {', '.join(ROPE_TYPES)})")
    if params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("partial_rotary_factor other than 1.0 is not supported")
    if kind == "default":
        return RopeSpec(theta=float(theta))
    if "factor" not in params:
        raise ConfigError(f"rope type '{kind}' needs a 'factor'")

    def number(key: str) -> float | None:
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"rope parameter '{key}' must be a number, got {value!r}")
        return None if value is None else float(value)

    mscale_all_dim = number("mscale_all_dim")
    if kind == "linear":
        return RopeSpec(theta=float(theta), kind=kind, factor=float(params["factor"]), mscale_all_dim=mscale_all_dim)
    if kind == "yarn":
        original = config.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
        original = original or require(config, "max_position_embeddings")
        if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
            raise ConfigError(
                f"rope parameter 'original_max_position_embeddings' must be a positive int, got {original!r}"
            )
        factor = number("factor")
        if factor is None:
            factor = require(config, "max_position_embeddings") / original
        if factor < 1.0:
            raise ConfigError(f"rope parameter 'factor' must be at least 1 for yarn, got {factor}")
        truncate = params.get("truncate", True)
        if not isinstance(truncate, bool):
            raise ConfigError(f"rope parameter 'truncate' must be true or false, got {truncate!r}")
        attention_factor = number("attention_factor")
        if attention_factor is not None and attention_factor < 0:
            raise ConfigError(f"rope parameter 'attention_factor' must not be negative, got {attention_factor}")
        return RopeSpec(
            theta=float(theta),
            kind=kind,
            factor=factor,
            original_max_position_embeddings=original,
            beta_fast=number("beta_fast") or 32.0,  # transformers: 0 and null both mean the default
            beta_slow=number("beta_slow") or 1.0,
            truncate=truncate,
            attention_factor=attention_factor,
            mscale=number("mscale"),
            mscale_all_dim=mscale_all_dim,
        )
    return RopeSpec(
        theta=float(theta),
        kind=kind,
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", config.get("max_position_embeddings", 8192))
        ),
        mscale_all_dim=mscale_all_dim,
    )


def token_ids(value: Any) -> tuple[int, ...]:
    """An id or list of ids (eos_token_id may be either) as a tuple."""
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def sliding_windows(config: dict[str, Any], num_layers: int, default_sliding: bool) -> tuple[int, ...]:
    """Per-layer window sizes: 0 for full attention, the window for 'sliding_attention' layers.

    Mistral slides in every layer when ``sliding_window`` is set; Qwen only with ``use_sliding_window``,
    from layer ``max_window_layers`` on, or as ``layer_types`` lists.
    """
    window = config.get("sliding_window")
    if not window:
        return (0,) * num_layers
    layer_types = config.get("layer_types")
    if layer_types is None:
        if default_sliding:
            layer_types = ["sliding_attention"] * num_layers
        elif config.get("use_sliding_window"):
            first = config.get("max_window_layers", num_layers)
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
        else:
            layer_types = ["full_attention"] * num_layers
    if len(layer_types) != num_layers:
        raise ConfigError(f"config.json layer_types has {len(layer_types)} entries for {num_layers} layers")
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ConfigError(f"config.json layer_types {sorted(unknown)} are not supported")
    return tuple(int(window) if t == "sliding_attention" else 0 for t in layer_types)


def generation_eos(model_dir: Path) -> tuple[int, ...] | None:
    """eos ids from generation_config.json, which generate() honours over config.json."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ConfigError(f"{path} is not a valid JSON object") from None
    return token_ids(value) or None
