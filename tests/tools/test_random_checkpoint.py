"""tools/random_checkpoint.py's presets write checkpoints our loader reads (the MoE one in per-expert layout)."""

from __future__ import annotations

import torch

from tools.bench import weight_bytes_per_step
from tools.random_checkpoint import write_checkpoint
from xllm_compiler.models import build_model

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4)


def test_the_moe_preset_loads_and_counts_only_routed_experts_as_read(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "moe", "mixtral-100m", **SMALL)
    model = build_model(checkpoint, torch.float32, 64)
    assert model.spec.moe is not None and model.spec.moe.num_experts == 8
    experts = 2 * 8 * 3 * 64 * 32  # layers x experts x (w1, w3, w2) x hidden x intermediate
    total = sum(p.numel() for p in model.parameters()) - (128 - 1) * 64  # one row of the input embedding
    assert weight_bytes_per_step(checkpoint, "float32") == 4 * (total - experts + experts * 2 // 8)


def test_the_deepseek_preset_loads_with_latent_attention_and_grouped_routing(tmp_path):
    small = dict(SMALL, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    small |= dict(num_key_value_heads=4, n_routed_experts=8, moe_intermediate_size=16)
    checkpoint = write_checkpoint(tmp_path / "deepseek", "deepseek", **small)
    model = build_model(checkpoint, torch.float32, 64)
    assert model.spec.mla is not None and model.spec.mla.kv_lora_rank == 16
    assert model.spec.moe.num_groups == 4 and model.spec.moe.sparse_layers == (False, True)
    experts = 8 * 3 * 64 * 16  # one sparse layer: experts x (gate, up, down) x hidden x moe_intermediate
    total = sum(p.numel() for p in model.parameters()) - (128 - 1) * 64
    assert weight_bytes_per_step(checkpoint, "float32") == 4 * (total - experts + experts * 4 // 8)
