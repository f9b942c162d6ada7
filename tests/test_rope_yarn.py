"""yarn rope scaling against transformers: inv_freq, the cos/sin attention factor, DeepSeek's softmax scale."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.test_hf_parity import check_parity
from xllm_compiler.errors import ConfigError
from xllm_compiler.models.config import rope_spec
from xllm_compiler.models.rope import attention_factor, cos_sin_tables, inverse_frequencies, softmax_scale

LLAMA = dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=256, rope_theta=10000.0)
DEEPSEEK = dict(max_position_embeddings=163840, rope_theta=10000.0, qk_nope_head_dim=128, qk_rope_head_dim=64)
DEEPSEEK_YARN = dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1)

#: (transformers config class, config.json) pairs; rope keys in the v4 style unless the id says v5.
CASES = {
    "llama": (
        "LlamaConfig",
        {**LLAMA, "rope_scaling": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)},
    ),
    "llama-no-truncate": (
        "LlamaConfig",
        {
            **LLAMA,
            "rope_scaling": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, truncate=False),
        },
    ),
    "llama-betas-attention-factor": (
        "LlamaConfig",
        {
            **LLAMA,
            "rope_scaling": dict(
                rope_type="yarn",
                factor=8,
                original_max_position_embeddings=32,
                beta_fast=16,
                beta_slow=2,
                attention_factor=0.9,
            ),
        },
    ),
    "llama-v5": (
        "LlamaConfig",
        {
            **{k: v for k, v in LLAMA.items() if k != "rope_theta"},
            "rope_parameters": dict(
                rope_type="yarn", rope_theta=500000.0, factor=2.0, original_max_position_embeddings=128
            ),
        },
    ),
    "llama-top-level-original": (
        "LlamaConfig",
        {
            **LLAMA,
            "original_max_position_embeddings": 32,
            "rope_scaling": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
        },
    ),
    "llama-original-from-max-positions": ("LlamaConfig", {**LLAMA, "rope_scaling": dict(rope_type="yarn", factor=4.0)}),
    "llama-v5-derived-factor": (
        "LlamaConfig",
        {
            **{k: v for k, v in LLAMA.items() if k != "rope_theta"},
            "rope_parameters": dict(
                rope_type="yarn", rope_theta=10000.0, factor=None, original_max_position_embeddings=32
            ),
        },
    ),
    "deepseek-mscale-1": (
        "DeepseekV3Config",
        {**DEEPSEEK, "rope_scaling": {**DEEPSEEK_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}},
    ),
    "deepseek-mscale-0.707": (
        "DeepseekV3Config",
        {**DEEPSEEK, "rope_scaling": {**DEEPSEEK_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}},
    ),
    "deepseek-mscale-mixed-no-truncate": (
        "DeepseekV3Config",
        {**DEEPSEEK, "rope_scaling": {**DEEPSEEK_YARN, "mscale": 1.0, "mscale_all_dim": 0.707, "truncate": False}},
    ),
    "deepseek-v5": (
        "DeepseekV3Config",
        {
            **{k: v for k, v in DEEPSEEK.items() if k != "rope_theta"},
            "rope_parameters": {**DEEPSEEK_YARN, "rope_theta": 10000.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        },
    ),
}


@pytest.fixture(autouse=True, scope="module")
def warm_vector_math():
    """On these 2-core machines the first float32 cos of a process is now and then wrong by up to 1.5e-4
    in one thread's half of the tensor (seen in 1 to 4 of 15 runs of a bare script of a few thousand
    elements; never with OMP_NUM_THREADS=1, never on a second call). Warm it, so the tables compare exactly."""
    torch.ones(4096).cos()


def hf_config(case: str):
    import transformers

    class_name, config = CASES[case]
    return getattr(transformers, class_name).from_dict(copy.deepcopy(config))  # it edits rope dicts in place


@pytest.mark.parametrize("case", sorted(CASES))
def test_yarn_inv_freq_and_attention_factor_equal_transformers(case):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = hf_config(case)
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    rope = rope_spec(CASES[case][1])
    assert torch.equal(inverse_frequencies(rope, config.head_dim), inv_freq)
    assert attention_factor(rope) == factor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["llama", "deepseek-mscale-mixed-no-truncate"])
def test_yarn_cos_sin_tables_equal_transformers_rotary_embedding(case, dtype):
    """transformers multiplies cos and sin by the attention factor in float32, then casts: so do we."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = hf_config(case)
    positions = torch.arange(300)
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=dtype), positions[None])
    ours = cos_sin_tables(rope_spec(CASES[case][1]), config.head_dim, 300, dtype)
    assert torch.equal(ours[0], cos[0]) and torch.equal(ours[1], sin[0])


@pytest.mark.parametrize("case", [c for c in sorted(CASES) if c.startswith("deepseek")])
def test_softmax_scale_equals_deepseek_v3(case):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    config = hf_config(case)
    expected = yarn_apply_mscale(config.rope_parameters, config.qk_head_dim ** (-0.5))
    assert softmax_scale(rope_spec(CASES[case][1]), config.qk_head_dim) == expected


def test_softmax_scale_is_plain_for_unscaled_rope():
    assert softmax_scale(rope_spec({"rope_theta": 10000.0}), 192) == 192 ** (-0.5)
    assert softmax_scale(rope_spec(CASES["llama"][1]), 192) == 192 ** (-0.5)  # no mscale_all_dim


def test_other_rope_types_keep_a_unit_attention_factor():
    for rope_scaling in ({"rope_type": "linear", "factor": 2.0}, {"rope_type": "llama3", "factor": 8.0}):
        rope = rope_spec({"rope_theta": 10000.0, "rope_scaling": rope_scaling})
        assert attention_factor(rope) == 1.0


@pytest.mark.parametrize(
    ("rope_scaling", "key"),
    [
        (dict(rope_type="yarn", factor=0.5, original_max_position_embeddings=64), "'factor'"),
        (dict(rope_type="yarn", original_max_position_embeddings=64), "'factor'"),
        (dict(rope_type="yarn", factor="4", original_max_position_embeddings=64), "'factor'"),
        (dict(rope_type="yarn", factor=None, original_max_position_embeddings=1024), "'factor'"),  # derives 0.25
        (dict(rope_type="yarn", factor=4.0, beta_fast="fast"), "'beta_fast'"),
        (dict(rope_type="yarn", factor=4.0, beta_slow=[1]), "'beta_slow'"),
        (dict(rope_type="yarn", factor=4.0, mscale_all_dim="1"), "'mscale_all_dim'"),
        (dict(rope_type="yarn", factor=4.0, attention_factor=-1.0), "'attention_factor'"),
        (dict(rope_type="yarn", factor=4.0, truncate="yes"), "'truncate'"),
        (
            dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64.5),
            "'original_max_position_embeddings'",
        ),
    ],
)
def test_bad_yarn_parameters_are_refused_by_name(rope_scaling, key):
    with pytest.raises(ConfigError, match=key):
        rope_spec({**LLAMA, "rope_scaling": rope_scaling})


def test_llama_with_yarn_rope_matches_transformers(checkpoints):
    """factor 4 over an original context of 64: the 56-token prompts + generation cross the ramp band, and
    the attention factor (1.14) scales every cos/sin row."""
    rope_scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    model_dir, hf_model = checkpoints.checkpoint("LlamaForCausalLM", rope_scaling=rope_scaling)
    check_parity(checkpoints, hf_model, model_dir)
