"""DeepSeek-V3 checkpoints (latent attention, grouped sigmoid routing) compiled and checked against transformers.

Tiny random models (tests/hf_oracle.py's DEEPSEEK_CONFIGS: 8 experts in 4 groups, 2 groups kept, top-2, a
dense first layer, a shared expert, a random ``e_score_correction_bias``): last-position logits and greedy
tokens in float32 for each attention and rope variant, bf16 within a measured tolerance, the absorbed decode
graphs against the unabsorbed ones, the latent KV cache's size, and the configs the model refuses.
"""

from __future__ import annotations

import json

import pytest
import torch

import xllm_compiler
from tests.hf_oracle import hf_in_float32, hf_last_logits, mixed_prompts
from tests.test_capture_safety import artifact_graphs
from tests.test_hf_parity import check_parity, relative_error
from tests.test_moe_parity import MIN_ROUTING_MARGIN
from xllm_compiler.artifact.manifest import read_manifest
from xllm_compiler.errors import ConfigError
from xllm_compiler.models import build_model
from xllm_compiler.models.registry import spec_from_config
from xllm_compiler.ops.reference import route_grouped_topk
from xllm_compiler.runtime.requests import Request, SamplingParams

ARCHITECTURE = "DeepseekV3ForCausalLM"
NEW_TOKENS = 16
#: DeepSeek's published rope: yarn with both mscales set. factor x original = max_position_embeddings, and the
#: mixed prompts plus 16 new tokens (up to 56 positions) run past the original 32.
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
VARIANTS = {
    "q-proj": dict(),
    "q-lora": dict(q_lora_rank=12),
    "tied-embeddings": dict(tie_word_embeddings=True),
    "rope-not-interleaved": dict(rope_interleave=False),
    # mscale == mscale_all_dim: cos/sin unscaled, the softmax scale corrected by mscale_all_dim squared
    "yarn": dict(rope_parameters=YARN, max_position_embeddings=128),
    # mscale != mscale_all_dim: cos/sin scaled by their ratio too
    "yarn-attention-factor": dict(rope_parameters={**YARN, "mscale_all_dim": 0.707}, max_position_embeddings=128),
}
#: bf16 logits, against transformers' bf16 and against transformers' float32 on the same bf16 weights (the
#: truth both approximate). Measured over 12 checkpoints (seeds 0-11) with our prefill attention on SDPA's
#: fused kernel (ops/mla.py pads V): ours vs transformers' bf16 0.45-1.02% of the logit range, ours vs float32
#: 0.61-1.10%, transformers' own bf16 vs float32 0.58-1.08%. Two correct bf16 implementations (a fused
#: online softmax against transformers' math path, which rounds the scores to bf16) part by about what either
#: is off the truth, so the bound is the dense parity test's 2e-2 (test_hf_parity), about twice the largest.
BF16_TOLERANCE = 2e-2
#: Small buckets keep compiles cheap: the prompts (up to 40 tokens) prefill through prefill_16/64 and the
#: fallback, then decode together in decode_4; decode_1 and prefill_16 are there to be rewritten or not.
OPTIONS = dict(decode_buckets=[1, 4], prefill_buckets=[16, 64], max_seq_len=64)


def step_logits(model, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens of each prompt, and the float32 logits [prompts, new_tokens, vocab] each was chosen from
    (the first from the prefill, the others from decode steps)."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, return_logits=True)
    scheduler = model.make_scheduler()
    with torch.inference_mode():
        outputs = scheduler.run(Request(str(i), p, params) for i, p in enumerate(prompts))
    runs = [[out for out in outputs[str(i)] if out.new_tokens] for i in range(len(prompts))]
    tokens = [[t for out in run for t in out.new_tokens] for run in runs]
    return tokens, torch.stack([torch.stack([out.logits for out in run]) for run in runs])


def hf_step_logits(hf_model, prompts: list[list[int]], tokens: list[list[int]]) -> torch.Tensor:
    """transformers' logits at the positions that chose ``tokens``, from one forward over prompt + tokens."""
    rows = []
    with torch.no_grad():
        for prompt, new in zip(prompts, tokens, strict=True):
            logits = hf_model(torch.tensor([prompt + new[:-1]])).logits[0].float()
            rows.append(logits[len(prompt) - 1 :])
    return torch.stack(rows)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_deepseek_matches_transformers(checkpoints, variant):
    model_dir, hf_model = checkpoints.checkpoint(ARCHITECTURE, **VARIANTS[variant])
    check_parity(checkpoints, hf_model, model_dir, new_tokens=NEW_TOKENS, **OPTIONS)


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
def test_deepseek_v2_matches_transformers(checkpoints, topk_method):
    """V2 through the same code: softmax scores, top-k over all experts or within the topk_group best groups
    (each scored by its best expert), not renormalised, times routed_scaling_factor."""
    model_dir, hf_model = checkpoints.checkpoint("DeepseekV2ForCausalLM", topk_method=topk_method)
    check_parity(checkpoints, hf_model, model_dir, new_tokens=NEW_TOKENS, **OPTIONS)


@pytest.mark.parametrize("variant", ["yarn", "yarn-attention-factor"])
def test_yarn_changes_the_logits(checkpoints, variant):
    """The yarn parity above is not vacuous: on the same weights, transformers' default rope gives logits
    farther from its yarn ones than the parity tolerance (1e-4), so a compile that ignored yarn would fail."""
    _, plain = checkpoints.checkpoint(ARCHITECTURE)
    _, scaled = checkpoints.checkpoint(ARCHITECTURE, **VARIANTS[variant])
    prompts = mixed_prompts(plain.config.vocab_size)
    assert relative_error(hf_last_logits(scaled, prompts), hf_last_logits(plain, prompts)) > 1e-4


@pytest.mark.parametrize("variant", ["q-proj", "q-lora"])
def test_routed_expert_ids_match_transformers(checkpoints, variant):
    """Each MoE layer's router, fed the hidden states transformers' router sees, picks the same experts with
    the same weights; no choice is a near-tie (group scores or expert scores within MIN_ROUTING_MARGIN), and
    both the correction bias and the group limit change some tokens' experts (measured: a third of them)."""
    model_dir, hf_model = checkpoints.checkpoint(ARCHITECTURE, **VARIANTS[variant])
    ours = build_model(model_dir, torch.float32, 64)
    moe = ours.spec.moe
    seen: dict[int, tuple[torch.Tensor, tuple]] = {}
    changed = torch.zeros(2, dtype=torch.int64)
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, (a[0], out)))
        for i, layer in enumerate(hf_model.model.layers)
        if i >= hf_model.config.first_k_dense_replace
    ]
    try:
        for prompt in mixed_prompts(hf_model.config.vocab_size):
            seen.clear()
            with torch.no_grad():
                hf_model(torch.tensor([prompt]))
            assert sorted(seen) == [i for i, sparse in enumerate(moe.sparse_layers) if sparse]
            for i, (hidden, (hf_logits, hf_weights, hf_ids)) in seen.items():
                block = ours.model.layers[i].mlp
                hidden = hidden.reshape(-1, hidden.shape[-1])
                _assert_no_near_tie(block, hidden, f"layer {i}")
                with torch.no_grad():
                    weights, ids = block.route(hidden)
                order, hf_order = ids.argsort(-1), hf_ids.argsort(-1)
                assert torch.equal(ids.gather(1, order), hf_ids.gather(1, hf_order)), f"layer {i}"
                torch.testing.assert_close(weights.gather(1, order), hf_weights.gather(1, hf_order))
                changed += _choices_the_bias_and_groups_change(hf_logits, ids, moe)
    finally:
        for hook in hooks:
            hook.remove()
    assert changed.min() > 0, f"tokens whose experts the bias, the group limit change: {changed.tolist()}"


def _choices_the_bias_and_groups_change(logits: torch.Tensor, ids: torch.Tensor, moe) -> torch.Tensor:
    """How many tokens would get other experts without the correction bias, and without the group limit:
    both must be some, or the comparison with transformers would not test them."""
    zero = torch.zeros(moe.num_experts)
    unbiased = route_grouped_topk(logits, zero, moe.top_k, moe.num_groups, moe.topk_groups, True, 1.0)[1]
    ungrouped = route_grouped_topk(logits, zero, moe.top_k, 1, 1, True, 1.0)[1]
    chosen = [i.sort(-1).values for i in (ids, unbiased, ungrouped)]
    return torch.tensor([(chosen[0] != chosen[1]).any(-1).sum(), (chosen[1] != chosen[2]).any(-1).sum()])


def _assert_no_near_tie(block, hidden: torch.Tensor, where: str) -> None:
    """The kept groups and, within them, the chosen experts each win by more than MIN_ROUTING_MARGIN of
    biased score: our hidden states differ from transformers' by ~1e-6 relative, so no choice can flip."""
    moe = block.moe
    with torch.no_grad():
        biased = torch.sigmoid(hidden.float() @ block.gate.weight.float().T) + block.gate.e_score_correction_bias
    grouped = biased.view(len(hidden), moe.num_groups, -1)
    group_scores = grouped.topk(2, dim=-1).values.sum(-1)
    ranked = group_scores.sort(-1, descending=True).values
    margin = ranked[:, moe.topk_groups - 1] - ranked[:, moe.topk_groups]
    assert margin.min() > MIN_ROUTING_MARGIN, f"{where}: a near-tie between groups makes the test unsound"
    kept = torch.zeros_like(group_scores).scatter(1, group_scores.topk(moe.topk_groups).indices, 1.0).bool()
    candidates = grouped.masked_fill(~kept.unsqueeze(-1), float("-inf")).flatten(1)
    top = candidates.topk(moe.top_k + 1).values
    margin = top[:, moe.top_k - 1] - top[:, moe.top_k]
    assert margin.min() > MIN_ROUTING_MARGIN, f"{where}: a near-tie between experts makes the test unsound"


def test_bfloat16_deepseek_checkpoint(checkpoints):
    """bf16 within BF16_TOLERANCE of the logit range of transformers' bf16 and of transformers' float32 on
    the same weights (bf16's eps is 2**-8; see BF16_TOLERANCE for the measured spread). Greedy tokens are not
    compared in bf16: over 12 checkpoints 1 sequence in 8 parted from transformers' within 8 tokens (near-ties
    flip the argmax). Compiled at float32, the bf16 checkpoint matches float32 transformers as tightly as ever."""
    model_dir, hf_bf16 = checkpoints.checkpoint(ARCHITECTURE, dtype="bfloat16")
    prompts = mixed_prompts(hf_bf16.config.vocab_size)
    artifact = checkpoints.artifact(model_dir, **OPTIONS)
    assert read_manifest(artifact).model.dtype == "bfloat16"
    ours = xllm_compiler.load(artifact).logits(prompts)
    hf_float32 = hf_in_float32(model_dir, ARCHITECTURE)
    assert relative_error(ours, hf_last_logits(hf_bf16, prompts)) < BF16_TOLERANCE
    assert relative_error(ours, hf_last_logits(hf_float32, prompts)) < BF16_TOLERANCE
    check_parity(checkpoints, hf_float32, model_dir, dtype="float32", **OPTIONS)


def attention_ops(artifact) -> dict[str, tuple[int, int]]:
    """Graph (bucket name or 'dynamic') -> its (xllm.mla_attention, xllm.latent_attention) node counts."""
    counts = {}
    for rel, graph in artifact_graphs(artifact).items():
        targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
        name = rel.rpartition("/")[2].removesuffix(".json")
        counts[name] = tuple(
            sum(t.startswith(f"xllm.{op}") for t in targets) for op in ("mla_attention", "latent_attention")
        )
    return counts


@pytest.mark.parametrize("variant", ["q-proj", "q-lora"])
def test_absorbed_decode_equals_unabsorbed(checkpoints, variant):
    """absorb_mla_weights only reassociates matmuls: the decode steps' logits within 1e-5 relative of the
    artifact compiled without it (measured 3-4e-7), the same greedy tokens, and every step within 1e-4 of
    transformers'. Decode buckets attend over the latent itself; prefill buckets and the fallback keep the
    expanding op; without the pass, every graph does."""
    model_dir, hf_model = checkpoints.checkpoint(ARCHITECTURE, **VARIANTS[variant])
    layers = hf_model.config.num_hidden_layers
    absorbed = checkpoints.artifact(model_dir, **OPTIONS)
    unabsorbed = checkpoints.artifact(model_dir, disable_passes=["absorb_mla_weights"], **OPTIONS)
    ops = attention_ops(absorbed)
    assert any(name.startswith("decode_") for name in ops) and "dynamic" in ops
    for name, counts in ops.items():
        assert counts == ((0, layers) if name.startswith("decode_") else (layers, 0)), name
    assert set(attention_ops(unabsorbed).values()) == {(layers, 0)}

    prompts = mixed_prompts(hf_model.config.vocab_size)
    model = xllm_compiler.load(absorbed)
    tokens, logits = step_logits(model, prompts, NEW_TOKENS)
    assert any(g.startswith("decode_") for g in model.engine.graphs.resident())
    reference_tokens, reference = step_logits(xllm_compiler.load(unabsorbed), prompts, NEW_TOKENS)
    assert tokens == reference_tokens
    assert relative_error(logits[:, 1:], reference[:, 1:]) < 1e-5  # the decode steps (the prefill: the same graph)
    assert relative_error(logits, hf_step_logits(hf_model, prompts, tokens)) < 1e-4


def test_absorption_is_verified_and_reported(checkpoints):
    """Compiled with verify=True (every pass checked numerically on sample inputs) the pass is accepted, and
    the report counts one absorbed attention per layer in each decode bucket, none in prefill buckets."""
    model_dir, hf_model = checkpoints.checkpoint(ARCHITECTURE)
    report = json.loads((checkpoints.artifact(model_dir, verify=True, **OPTIONS) / "report.json").read_text())
    layers = hf_model.config.num_hidden_layers
    for phase, expected in (("decode", layers), ("prefill", 0)):
        for bucket in report["buckets"][phase]["buckets"]:
            assert bucket["pass_matches"].get("absorb_mla_weights", 0) == expected, bucket


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_cache_holds_the_latent(checkpoints, dtype):
    """One row of kv_lora_rank + qk_rope_head_dim values per token and layer, reported next to what expanded
    keys and values would take (every head's nope + rope key and v value), in the manifest, memory_stats()
    and report.json alike."""
    model_dir, hf_model = checkpoints.checkpoint(ARCHITECTURE, dtype=dtype)  # the artifacts of the tests above
    config = hf_model.config
    artifact = checkpoints.artifact(model_dir, **OPTIONS)
    layers, itemsize = config.num_hidden_layers, getattr(torch, dtype).itemsize
    latent = config.kv_lora_rank + config.qk_rope_head_dim
    expanded = config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    per_token, expanded_per_token = layers * latent * itemsize, layers * expanded * itemsize

    manifest = read_manifest(artifact)
    assert (manifest.kv_cache.planes, manifest.model.num_kv_heads, manifest.model.head_dim) == (1, 1, latent)
    assert manifest.kv_cache.expanded_width == expanded
    model = xllm_compiler.load(artifact)
    stats = model.memory_stats()
    assert (stats["kv_bytes_per_token"], stats["expanded_kv_bytes_per_token"]) == (per_token, expanded_per_token)
    cache = model.engine.kv_cache.tensor  # [layers, planes, blocks, block_size, heads, values]: what was allocated
    assert (cache.shape[:2], cache.shape[3:]) == ((layers, 1), (stats["kv_block_size"], 1, latent))
    assert cache.dtype == getattr(torch, dtype)
    assert stats["kv_cache_bytes"] == cache.shape[2] * stats["kv_block_size"] * per_token
    report = json.loads((artifact / "report.json").read_text())["load_memory"]
    assert (report["kv_bytes_per_token"], report["expanded_kv_bytes_per_token"]) == (per_token, expanded_per_token)


def test_dense_models_report_no_expanded_size(checkpoints):
    stats = xllm_compiler.load(checkpoints.artifact(checkpoints.checkpoint("LlamaForCausalLM")[0])).memory_stats()
    assert "expanded_kv_bytes_per_token" not in stats


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(n_group=3), r"n_group 3 must divide n_routed_experts 8"),
        (dict(n_group=8), r"n_group 8 must divide n_routed_experts 8 into groups of 2"),
        (dict(topk_group=1, num_experts_per_tok=3), r"topk_group 1 cannot give num_experts_per_tok 3"),
        (dict(topk_group=5), r"topk_group 5 cannot give"),
        (dict(scoring_func="softmax"), r"scoring_func 'softmax' is not supported \(only 'sigmoid'\)"),
        (dict(topk_method="greedy"), r"topk_method 'greedy' is not supported \(only 'noaux_tc'\)"),
        (dict(qk_rope_head_dim=5), r"qk_rope_head_dim 5 must be even"),
    ],
    ids=[
        "groups-do-not-divide",
        "groups-of-one",
        "too-few-groups-kept",
        "more-groups-kept-than-exist",
        "softmax-scoring",
        "greedy-topk-method",
        "odd-rope-dim",
    ],
)
def test_bad_deepseek_config_is_refused(checkpoints, overrides, message):
    model_dir, _ = checkpoints.checkpoint(ARCHITECTURE)
    config = {**json.loads((model_dir / "config.json").read_text()), **overrides}
    with pytest.raises(ConfigError, match=message):
        spec_from_config(config)
