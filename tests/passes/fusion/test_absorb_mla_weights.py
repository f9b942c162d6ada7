"""absorb_mla_weights: decode buckets of an MLA model attend over the latent cache (xllm::latent_attention)."""

from __future__ import annotations

import pytest
import torch

from tests.passes.graphs import xllm
from xllm_compiler.buckets.policy import DECODE, PREFILL, Bucket
from xllm_compiler.buckets.specialize import specialize
from xllm_compiler.passes import default_pipeline
from xllm_compiler.passes.fusion.absorb_mla_weights import absorb_mla_weights
from xllm_compiler.testing import build_graph, check_pass, count, tiny_config

MLA = dict(
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,
    moe_intermediate_size=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
)


def deepseek(num_layers: int, **overrides) -> dict:
    return tiny_config("DeepseekV3ForCausalLM", num_hidden_layers=num_layers, **{**MLA, **overrides})


@pytest.mark.parametrize("q_lora_rank", [None, 12], ids=["q-proj", "q-lora"])
@pytest.mark.parametrize("num_layers", [2, 3])
def test_absorbs_every_layer_of_a_decode_bucket(num_layers, q_lora_rank):
    """Two sequences, one decode row each, over caches a prefill wrote: the same logits through the latent
    as through expanded keys and values (fp32: 1e-5 of the largest; only the matmuls' association changes)."""
    checks = check_pass(
        absorb_mla_weights,
        deepseek(num_layers, q_lora_rank=q_lora_rank),
        num_layers,
        bucket=Bucket(DECODE, 2, 2),
        ops_before={xllm.mla_attention.default: num_layers, xllm.latent_attention.default: 0},
        ops_after={xllm.mla_attention.default: 0, xllm.latent_attention.default: num_layers},
        dtypes=(torch.float32,),
    )
    assert checks[0].error < 1e-5


@pytest.mark.parametrize("q_lora_rank", [None, 12], ids=["q-proj", "q-lora"])
def test_absorbed_bfloat16_within_its_tolerance(q_lora_rank):
    """bf16 (2e-2 of the largest logit), with dense MLPs only: on random tiny weights a bf16 rounding
    difference can flip an MoE top-k choice (measured: 0.78 in one 3-layer case, 5e-3 with the same
    layers dense), which says nothing about the attention rewrite under test."""
    check_pass(
        absorb_mla_weights,
        deepseek(3, q_lora_rank=q_lora_rank, first_k_dense_replace=3),
        3,
        bucket=Bucket(DECODE, 2, 2),
        dtypes=(torch.bfloat16,),
    )


def test_leaves_prefill_buckets_and_the_whole_graph_alone():
    gm = build_graph(deepseek(2))
    for graph_pass in default_pipeline():
        graph_pass(gm)
    assert not absorb_mla_weights(gm)  # the fallback graph serves every shape: it stays unabsorbed
    prefill = specialize(gm, Bucket(PREFILL, 8, 2))
    assert absorb_mla_weights(prefill).matches == 0
    assert count(prefill, xllm.mla_attention.default) == 2


def test_does_nothing_to_models_without_mla():
    gm = specialize(build_graph(tiny_config("LlamaForCausalLM")), Bucket(DECODE, 2, 2))
    assert not absorb_mla_weights(gm)
