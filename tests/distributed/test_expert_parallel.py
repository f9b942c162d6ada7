"""Expert parallelism end to end: --ep 2 artifacts of every MoE architecture, without and with a placement
plan (--expert-placement, 2 redundant experts), run under torchrun (gloo, 2 CPU processes) against the
--ep 1 artifact: the same logits (fp32, 1e-5 relative) and greedy tokens, each rank holding its experts,
one all-reduce per MoE layer and none for attention, and the expert stats the same on every rank.

One torchrun launch of ``worker.py`` runs every --ep 2 artifact of the module; the tests read its answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import xllm_compiler
from tests.distributed.test_tensor_parallel import NEW_TOKENS, PROMPT_LENGTHS, relative_error, run_worker
from tests.hf_oracle import DEEPSEEK_CONFIGS, MOE_ARCHITECTURE_CONFIGS, TINY, mixed_prompts
from tests.test_capture_safety import artifact_graphs
from xllm_compiler.artifact.manifest import read_manifest

pytestmark = pytest.mark.distributed

ARCHITECTURES = sorted(MOE_ARCHITECTURE_CONFIGS)
#: DeepSeek-V3 too (grouped sigmoid routing, a dense first layer, a replicated shared expert), in every test but
#: the softmax-routed ones' op count.
EP_ARCHITECTURES = [*ARCHITECTURES, *sorted(DEEPSEEK_CONFIGS)]
CONFIGS = {**MOE_ARCHITECTURE_CONFIGS, **DEEPSEEK_CONFIGS}
REDUNDANT = 2
#: micro_batch_min_tokens=8 so that the tiny buckets are split into micro-batches too.
OPTIONS = dict(
    decode_buckets=[1, 2, 8], prefill_buckets=[16, 32], max_seq_len=64, cache_dir="", micro_batch_min_tokens=8
)


def expert_count(architecture: str) -> int:
    config = CONFIGS[architecture]
    return config.get("num_experts") or config.get("n_routed_experts") or config["num_local_experts"]


@dataclass
class ExpertParallelRun:
    prompts: list[list[int]]
    ep1: dict[str, Path] = field(default_factory=dict)
    ep2: dict[str, Path] = field(default_factory=dict)  # architecture, or "<architecture>+plan"
    reference: dict[str, dict] = field(default_factory=dict)  # architecture -> the --ep 1 run, in this process
    ranks: dict[int, dict] = field(default_factory=dict)

    def result(self, name: str, rank: int = 0) -> dict:
        return self.ranks[rank]["results"][name]


@pytest.fixture(scope="module")
def ep_run(checkpoints, tmp_path_factory) -> ExpertParallelRun:
    root = tmp_path_factory.mktemp("ep")
    prompts = mixed_prompts(TINY["vocab_size"], lengths=PROMPT_LENGTHS)
    state = ExpertParallelRun(prompts)
    for architecture in EP_ARCHITECTURES:
        model_dir, _ = checkpoints.checkpoint(architecture)
        state.ep1[architecture] = checkpoints.artifact(model_dir, **OPTIONS)
        state.ep2[architecture] = checkpoints.artifact(model_dir, ep=2, **OPTIONS)
        model = xllm_compiler.load(state.ep1[architecture])
        state.reference[architecture] = {
            "logits": model.logits(prompts),
            "tokens": model.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True),
        }
        stats = root / f"{architecture}.stats.json"
        stats.write_text(json.dumps(model.expert_stats()))
        planned = dict(ep=2, expert_placement=str(stats), redundant_experts=REDUNDANT, **OPTIONS)
        state.ep2[f"{architecture}+plan"] = checkpoints.artifact(model_dir, **planned)
    launch, state.ranks = run_worker(root / "worker", state.ep2, prompts)
    assert launch.returncode == 0, launch.explain()
    assert sorted(state.ranks) == [0, 1], launch.explain()
    return state


@pytest.mark.parametrize("architecture", EP_ARCHITECTURES)
def test_ep2_matches_ep1(ep_run, architecture):
    """Each (token, expert) pair is computed on one rank and the partial sums all-reduced: only the order
    of a sum changes, so fp32 logits agree within 1e-5 relative, and greedy tokens exactly."""
    ours, reference = ep_run.result(architecture), ep_run.reference[architecture]
    assert relative_error(torch.tensor(ours["logits"]), reference["logits"]) < 1e-5
    assert ours["tokens"] == reference["tokens"]


@pytest.mark.parametrize("architecture", EP_ARCHITECTURES)
def test_ranks_agree(ep_run, architecture):
    assert ep_run.result(architecture, 1)["tokens"] == ep_run.result(architecture, 0)["tokens"]
    assert ep_run.ranks[0]["world_size"] == 2


@pytest.mark.parametrize("architecture", EP_ARCHITECTURES)
def test_each_rank_holds_its_half_of_the_experts(ep_run, architecture):
    artifact = ep_run.ep2[architecture]
    layout = read_manifest(artifact).tensor_parallel
    assert (layout.size, layout.expert_parallel) == (2, 2)
    experts = expert_count(architecture)
    with safe_open(ep_run.ep1[architecture] / "weights.safetensors", "pt") as f:
        replicated = {k: f.get_tensor(k) for k in f.keys() if ".experts." not in k}  # noqa: SIM118
    for rank, weights in enumerate(layout.weights):
        with safe_open(artifact / weights, "pt") as f:
            tables = [f.get_tensor(k) for k in f.keys() if k.endswith("expert_table")]  # noqa: SIM118
            stacked = [f.get_tensor(k) for k in f.keys() if k.endswith("experts.gate_up_proj")]  # noqa: SIM118
            assert all(torch.equal(f.get_tensor(k), tensor) for k, tensor in replicated.items())
        assert tables and all(t.shape == (experts,) for t in tables)  # one column: no replicas
        held = (tables[0] >= 0).nonzero().flatten().tolist()
        assert held == list(range(rank * experts // 2, (rank + 1) * experts // 2))
        assert all(s.shape[0] == experts // 2 for s in stacked)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_one_all_reduce_per_moe_layer(ep_run, architecture):
    """Attention is replicated (no collective); each MoE layer's partial sums take one all-reduce (maybe
    fused with the next add + norm), and one fused MoE op."""
    layers = TINY["num_hidden_layers"]
    for rel, graph in artifact_graphs(ep_run.ep2[architecture]).items():
        targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
        reduces = sum("all_reduce" in t for t in targets)
        moe = sum(t.startswith("xllm.fused_moe") for t in targets)
        assert moe in (layers, 2 * layers), rel
        assert reduces == moe, rel  # one per MoE op: per layer, or per layer and micro-batch


@pytest.mark.parametrize("architecture", EP_ARCHITECTURES)
def test_expert_stats_are_the_whole_models_on_every_rank(ep_run, architecture):
    """Every rank routes every token (the router is replicated), so each counts the whole model's routing:
    the ranks agree, and each layer's counts add up to top_k per token seen."""
    stats = [ep_run.result(architecture, rank)["expert_stats"] for rank in (0, 1)]
    assert stats[0] == stats[1]
    top_k = CONFIGS[architecture]["num_experts_per_tok"]
    assert stats[0]["tokens"] > 0
    assert all(sum(layer) == top_k * stats[0]["tokens"] for layer in stats[0]["layers"])


@pytest.mark.parametrize("architecture", EP_ARCHITECTURES)
def test_placement_plan_changes_no_result(ep_run, architecture):
    """Replicas hold the same weights, so which one serves a token changes only the order of a sum."""
    ours, reference = ep_run.result(f"{architecture}+plan"), ep_run.reference[architecture]
    assert relative_error(torch.tensor(ours["logits"]), reference["logits"]) < 1e-5
    assert ours["tokens"] == reference["tokens"]
    assert ours["expert_stats"] == ep_run.result(architecture)["expert_stats"]


@pytest.mark.parametrize("architecture", EP_ARCHITECTURES)
def test_placement_plan_replicates_and_reports(ep_run, architecture):
    artifact = ep_run.ep2[f"{architecture}+plan"]
    report = json.loads((artifact / "report.json").read_text())["experts"]
    experts = expert_count(architecture)
    for layer in report["plan"]["layers"]:
        assert [len(rank) for rank in layer["slots"]] == [(experts + REDUNDANT) // 2] * 2
        assert {e for rank in layer["slots"] for e in rank} == set(range(experts))  # every expert placed
        replicated = [e for e in range(experts) if all(e in rank for rank in layer["slots"])]
        assert len(replicated) == REDUNDANT  # each extra slot holds a replica on the other rank
        assert all(len(set(layer["columns"][e])) == 2 for e in replicated)  # both replicas serve columns
    for before, after in zip(report["max_over_mean"]["before"], report["max_over_mean"]["after"], strict=True):
        assert 1.0 <= after <= before
    assert all(abs(sum(share) - 1) < 1e-3 for share in report["load_share"]["after"])
    layout = read_manifest(artifact).tensor_parallel
    for weights in layout.weights:
        with safe_open(artifact / weights, "pt") as f:
            stacked = [f.get_tensor(k) for k in f.keys() if k.endswith("experts.gate_up_proj")]  # noqa: SIM118
        assert all(t.shape[0] == (experts + REDUNDANT) // 2 for t in stacked)


def test_deepseek_has_one_all_reduce_per_moe_layer(ep_run):
    """The dense first layer and attention are replicated (no collective); each MoE layer's routed experts
    take one all-reduce, their partial sums joined before the replicated shared expert is added."""
    architecture = "DeepseekV3ForCausalLM"
    sparse = TINY["num_hidden_layers"] - CONFIGS[architecture]["first_k_dense_replace"]
    for rel, graph in artifact_graphs(ep_run.ep2[architecture]).items():
        targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
        experts = sum(t.startswith(("xllm.moe_experts", "xllm.fused_moe")) for t in targets)
        assert experts in (sparse, 2 * sparse), rel
        assert sum("all_reduce" in t for t in targets) == experts, rel
