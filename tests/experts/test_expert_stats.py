"""Expert stats: the routing counts the MoE graphs accumulate (real tokens only) against the routing
transformers computes from its own router logits, and ``xllm-run --expert-stats FILE.json``."""

from __future__ import annotations

import json

import pytest
import torch

import xllm_compiler
from tests.hf_oracle import MOE_ARCHITECTURE_CONFIGS, TINY, mixed_prompts
from xllm_compiler import run

ARCHITECTURES = sorted(MOE_ARCHITECTURE_CONFIGS)
#: Prompts of 5, 3 and 9 tokens: 17 real tokens in a 32-token prefill bucket, so 15 padding rows that
#: must not be counted; then decode steps of 3 sequences in the decode_4 bucket (one padding row each).
OPTIONS = dict(decode_buckets=[1, 4], prefill_buckets=[32], max_seq_len=64, cache_dir="")
LENGTHS = (5, 3, 9)
NEW_TOKENS = 4


def hf_routing_counts(hf_model, sequences: list[list[int]]) -> list[list[int]]:
    """Per MoE layer, tokens routed to each expert when transformers runs each whole sequence."""
    config = hf_model.config
    experts = getattr(config, "num_experts", None) or config.num_local_experts
    counts = torch.zeros(config.num_hidden_layers, experts, dtype=torch.int64)
    with torch.no_grad():
        for tokens in sequences:
            router_logits = hf_model(torch.tensor([tokens]), output_router_logits=True).router_logits
            for i, logits in enumerate(router_logits):
                ids = torch.topk(torch.softmax(logits.float(), -1), config.num_experts_per_tok).indices
                counts[i] += torch.bincount(ids.flatten(), minlength=experts)
    return counts[: len(router_logits)].tolist()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_counts_match_transformers_routing(checkpoints, architecture):
    model_dir, hf_model = checkpoints.checkpoint(architecture)
    model = xllm_compiler.load(checkpoints.artifact(model_dir, **OPTIONS))
    prompts = mixed_prompts(TINY["vocab_size"], lengths=LENGTHS)
    generated = model.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert model.stats()["padded_tokens"] > 0
    stats = model.expert_stats()
    # Every token the model computed: the prompts and all new tokens but the last (sampled, never fed back).
    computed = [p + g[:-1] for p, g in zip(prompts, generated, strict=True)]
    assert stats["tokens"] == sum(len(c) for c in computed)
    assert stats["layers"] == hf_routing_counts(hf_model, computed)


def test_counts_start_at_zero_and_accumulate(checkpoints):
    model_dir, _ = checkpoints.checkpoint("Qwen3MoeForCausalLM")
    artifact = checkpoints.artifact(model_dir, **OPTIONS)
    model = xllm_compiler.load(artifact)
    assert model.expert_stats() == {"layers": [[0] * 8] * TINY["num_hidden_layers"], "tokens": 0}
    model.logits([[1, 2, 3]])
    first = model.expert_stats()
    model.logits([[1, 2, 3]])
    assert model.expert_stats()["tokens"] == 2 * first["tokens"] == 6
    assert xllm_compiler.load(artifact).expert_stats()["tokens"] == 0  # a fresh load counts afresh


def test_dense_model_has_no_expert_stats(checkpoints):
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    model = xllm_compiler.load(checkpoints.artifact(model_dir, **OPTIONS))
    assert model.expert_stats() == {"layers": [], "tokens": 0}


def test_xllm_run_writes_expert_stats(checkpoints, tmp_path, capsys):
    model_dir, _ = checkpoints.checkpoint("MixtralForCausalLM")
    artifact = checkpoints.artifact(model_dir, **OPTIONS)
    out = tmp_path / "stats.json"
    rc = run.main([str(artifact), "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--expert-stats", str(out)])
    assert rc == 0
    stats = json.loads(out.read_text())
    assert stats["tokens"] == 4  # three prompt tokens and the first new one
    assert [sum(layer) for layer in stats["layers"]] == [2 * 4] * TINY["num_hidden_layers"]
