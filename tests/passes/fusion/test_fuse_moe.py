"""fuse_moe: MoE routing (softmax, top-k, renormalise, cast) and xllm::moe_experts become xllm::fused_moe."""

from __future__ import annotations

import pytest
import torch

from tests.passes.graphs import xllm
from xllm_compiler.ops import reference
from xllm_compiler.passes.fusion.fuse_moe import fuse_moe
from xllm_compiler.testing import check_pass, cleanup, count, tiny_config, trace

MOE_CONFIGS = {
    # Qwen: top-k weights cast to the model dtype; here not renormalised, with a shared expert.
    "Qwen2MoeForCausalLM": dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16),
    # Renormalised, and only every second layer routes.
    "Qwen3MoeForCausalLM": dict(num_experts=4, moe_intermediate_size=16, norm_topk_prob=True, decoder_sparse_step=2),
    # Mixtral: renormalised, weights kept in float32.
    "MixtralForCausalLM": dict(num_local_experts=4),
}


@pytest.mark.parametrize("num_layers", [2, 4])
@pytest.mark.parametrize("architecture", sorted(MOE_CONFIGS))
def test_fuses_every_moe_layer(architecture, num_layers):
    config = tiny_config(architecture, num_hidden_layers=num_layers, num_experts_per_tok=2, **MOE_CONFIGS[architecture])
    layers = num_layers // 2 if "decoder_sparse_step" in MOE_CONFIGS[architecture] else num_layers
    check_pass(
        fuse_moe,
        config,
        layers,
        ops_before={xllm.moe_experts.default: layers, xllm.fused_moe.default: 0, torch.ops.aten.topk.default: layers},
        ops_after={xllm.moe_experts.default: 0, xllm.fused_moe.default: layers, torch.ops.aten.topk.default: 0},
    )


@pytest.mark.parametrize("ids_escape", [False, True], ids=["fuses", "declines-when-ids-escape"])
def test_declines_when_the_routing_is_used_elsewhere(ids_escape):
    """Where the router's top-k ids are used after the experts (here: returned), fusing would lose them."""
    gate_up, down = torch.randn(4, 16, 8), torch.randn(4, 8, 8)

    def fn(x, logits):
        weights, ids = reference.route_topk(logits, 2, True)
        out = torch.ops.xllm.moe_experts.default(x, weights, ids, gate_up, down)
        return (out, ids) if ids_escape else out

    gm = cleanup(trace(fn, torch.randn(5, 8), torch.randn(5, 4), weights=dict(gate_up=gate_up, down=down)))
    assert fuse_moe(gm).matches == (0 if ids_escape else 1)
    assert count(gm, xllm.moe_experts.default) == (1 if ids_escape else 0)
