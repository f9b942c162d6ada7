"""Mixture-of-experts checkpoints (Qwen3-MoE, Qwen2-MoE, Mixtral) compiled and checked against transformers.

The routed expert ids are compared exactly, on hidden states where no top-k choice is a near-tie: the
margin between each token's k-th and (k+1)-th routing probability is asserted above MIN_ROUTING_MARGIN.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import xllm_compiler
from tests.hf_oracle import MOE_ARCHITECTURE_CONFIGS, hf_in_float32, hf_last_logits, mixed_prompts
from tests.test_capture_safety import artifact_graphs
from tests.test_hf_parity import check_parity, relative_error
from xllm_compiler.errors import CheckpointError, ConfigError, OptionsError
from xllm_compiler.models import build_model
from xllm_compiler.models.parallel import TensorParallel
from xllm_compiler.models.registry import spec_from_config
from xllm_compiler.ops.reference import route_topk

ARCHITECTURES = sorted(MOE_ARCHITECTURE_CONFIGS)
#: Our hidden states agree with transformers' to ~1e-6 relative (the logits measure 4-7e-7), so a routing
#: probability margin ten times that cannot flip; the tiny configs' smallest margin is 4.6e-5.
MIN_ROUTING_MARGIN = 1e-5


def moe_nodes(artifact: Path, op: str = "xllm.fused_moe") -> dict[str, int]:
    """Graph file -> its number of ``op`` nodes (functional or out form)."""
    return {
        rel: sum(str(n.target).startswith(op) for n in graph.nodes) for rel, graph in artifact_graphs(artifact).items()
    }


def fused_layout(model_dir: Path, dest: Path) -> Path:
    """A copy of a per-expert checkpoint with each layer's experts as two 3-D tensors (gate_up, down)."""
    tensors = load_file(model_dir / "model.safetensors")
    fused: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        head, sep, tail = name.partition(".experts.")
        if not sep:
            fused[name] = tensor
            continue
        index, projection, _ = tail.split(".")
        experts.setdefault(head, {}).setdefault(int(index), {})[projection] = tensor
    for head, by_index in experts.items():
        ordered = [by_index[i] for i in range(len(by_index))]
        gate, up, down = ("w1", "w3", "w2") if "w1" in ordered[0] else ("gate_proj", "up_proj", "down_proj")
        fused[f"{head}.experts.gate_up_proj"] = torch.stack([torch.cat([e[gate], e[up]]) for e in ordered])
        fused[f"{head}.experts.down_proj"] = torch.stack([e[down] for e in ordered])
    dest.mkdir()
    shutil.copy(model_dir / "config.json", dest / "config.json")
    save_file(fused, dest / "model.safetensors")
    return dest


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_moe_architecture_matches_transformers(checkpoints, architecture):
    model_dir, hf_model = checkpoints.checkpoint(architecture)
    check_parity(checkpoints, hf_model, model_dir)
    artifact = checkpoints.artifact(model_dir)
    assert set(moe_nodes(artifact).values()) == {2}  # one opaque op per MoE layer, however many experts
    planned = [g for rel, g in artifact_graphs(artifact).items() if "decode" in rel]
    assert all(any(str(n.target).startswith("xllm.fused_moe_out") for n in g.nodes) for g in planned)


@pytest.mark.parametrize("architecture", ["Qwen2MoeForCausalLM", "MixtralForCausalLM"])
def test_moe_without_fuse_moe_matches_transformers(checkpoints, architecture):
    """--disable-pass fuse_moe: the reference routing and xllm::moe_experts, compiled as they are."""
    model_dir, hf_model = checkpoints.checkpoint(architecture)
    check_parity(checkpoints, hf_model, model_dir, disable_passes=("fuse_moe",))
    artifact = checkpoints.artifact(model_dir, disable_passes=("fuse_moe",))
    assert set(moe_nodes(artifact, "xllm.moe_experts").values()) == {2}
    assert set(moe_nodes(artifact).values()) == {0}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_routed_expert_ids_match_transformers(checkpoints, architecture):
    """Each MoE layer's router, fed the hidden states transformers' layer sees, picks the same experts."""
    model_dir, hf_model = checkpoints.checkpoint(architecture)
    ours = build_model(model_dir, torch.float32, 64)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(hf_model.model.layers):
        hooks.append(layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, (a[0], out))))
    moe = ours.spec.moe
    for prompt in mixed_prompts(hf_model.config.vocab_size):
        with torch.no_grad():
            hf_model(torch.tensor([prompt]))
        _check_routing(ours, moe, seen)
    for hook in hooks:
        hook.remove()


def _check_routing(ours, moe, seen: dict[int, tuple[torch.Tensor, tuple]]) -> None:
    for i, (hidden, (_, hf_weights, hf_ids)) in seen.items():
        block = getattr(ours.model.layers[i], moe.module)
        probs = torch.softmax(block.gate(hidden.reshape(-1, hidden.shape[-1])), -1, dtype=torch.float32)
        top = probs.topk(moe.top_k + 1).values
        assert (top[:, -2] - top[:, -1]).min() > MIN_ROUTING_MARGIN, f"layer {i}: a near-tie makes the test unsound"
        with torch.no_grad():
            weights, ids = route_topk(block.gate(hidden), moe.top_k, moe.renormalise)
        assert torch.equal(ids, hf_ids), f"layer {i}"
        torch.testing.assert_close(weights, hf_weights.float())


@pytest.mark.parametrize(
    "architecture, variant, moe_layers",
    [
        ("Qwen3MoeForCausalLM", dict(mlp_only_layers=[0]), 1),
        ("Qwen3MoeForCausalLM", dict(decoder_sparse_step=2, norm_topk_prob=True), 1),
        ("Qwen2MoeForCausalLM", dict(norm_topk_prob=True), 2),
    ],
    ids=["mlp-only-layers", "sparse-step-2-renormalised", "qwen2-renormalised"],
)
def test_moe_variants_match_transformers(checkpoints, architecture, variant, moe_layers):
    model_dir, hf_model = checkpoints.checkpoint(architecture, **variant)
    check_parity(checkpoints, hf_model, model_dir)
    assert set(moe_nodes(checkpoints.artifact(model_dir)).values()) == {moe_layers}


@pytest.mark.parametrize("architecture", ["MixtralForCausalLM", "Qwen2MoeForCausalLM"])
def test_fused_expert_layout_matches_transformers(checkpoints, tmp_path, architecture):
    model_dir, hf_model = checkpoints.checkpoint(architecture)
    check_parity(checkpoints, hf_model, fused_layout(model_dir, tmp_path / "fused"))


def test_bfloat16_moe_checkpoint(checkpoints):
    """The tolerance of test_hf_parity's bf16 test (2e-2 of the logit range: a few bf16 eps, sums in
    another order; measured here 0.5%), on a seed where no top-k choice is closer than bf16's rounding of
    the router logits: there two correct bf16 implementations may route a token differently and that
    token's output changes wholesale (seed 0 of this config does so once: 2.8e-2). Routing itself is
    float32 in both. Compiled at float32 the bf16 checkpoint matches float32 as tightly as ever."""
    model_dir, hf_bf16 = checkpoints.checkpoint("Qwen2MoeForCausalLM", dtype="bfloat16", seed=1)
    prompts = mixed_prompts(hf_bf16.config.vocab_size)
    ours = xllm_compiler.load(checkpoints.artifact(model_dir)).logits(prompts)
    assert relative_error(ours, hf_last_logits(hf_bf16, prompts)) < 2e-2
    check_parity(checkpoints, hf_in_float32(model_dir, "Qwen2MoeForCausalLM"), model_dir, dtype="float32")


def test_moe_compiles_with_verify(checkpoints):
    model_dir, _ = checkpoints.checkpoint("Qwen2MoeForCausalLM")
    assert set(moe_nodes(checkpoints.artifact(model_dir, verify=True)).values()) == {2}


def _per_expert_copy(model_dir: Path, dest: Path, edit) -> Path:
    tensors = load_file(model_dir / "model.safetensors")
    edit(tensors)
    dest.mkdir()
    shutil.copy(model_dir / "config.json", dest / "config.json")
    save_file(tensors, dest / "model.safetensors")
    return dest


EXPERT = "model.layers.1.mlp.experts.{}.up_proj.weight"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop(EXPERT.format(3)), r"tensor 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight' is missing"),
        (
            lambda t: t.__setitem__(EXPERT.format(8).replace("up_proj", "gate_proj"), t[EXPERT.format(0)].clone()),
            r"'model\.layers\.1\.mlp\.experts\.8\.gate_proj\.weight': more experts than the 8",
        ),
        (
            lambda t: t.__setitem__(EXPERT.format(2), t[EXPERT.format(2)][:-1]),
            r"'model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight' has shape \[31, 32\], expected \[32, 32\]",
        ),
    ],
    ids=["missing-expert", "extra-expert", "wrong-shape"],
)
def test_a_bad_expert_tensor_is_named(checkpoints, tmp_path, edit, message):
    model_dir, _ = checkpoints.checkpoint("Qwen3MoeForCausalLM")
    with pytest.raises(CheckpointError, match=message):
        build_model(_per_expert_copy(model_dir, tmp_path / "bad", edit), torch.float32, 64)


def test_a_fused_expert_tensor_of_the_wrong_count_is_named(checkpoints, tmp_path):
    model_dir, _ = checkpoints.checkpoint("MixtralForCausalLM")
    fused = fused_layout(model_dir, tmp_path / "fused")
    tensors = load_file(fused / "model.safetensors")
    name = "model.layers.0.block_sparse_moe.experts.down_proj"
    tensors[name] = tensors[name][:-1]
    save_file(tensors, fused / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has shape \[3, 32, 32\], expected \[4, 32, 32\]"):
        build_model(fused, torch.float32, 64)


def test_top_k_above_the_expert_count_is_refused(checkpoints):
    model_dir, _ = checkpoints.checkpoint("Qwen2MoeForCausalLM")
    config = {**json.loads((model_dir / "config.json").read_text()), "num_experts_per_tok": 9}
    with pytest.raises(ConfigError, match=r"^config\.json num_experts_per_tok 9 is greater than the expert count 8$"):
        spec_from_config(config)


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
@pytest.mark.parametrize("architecture", ["Qwen2MoeForCausalLM", "MixtralForCausalLM"])
def test_tensor_parallel_expert_shards_sum_to_the_whole(checkpoints, tmp_path, architecture, layout):
    """Each --tp 2 rank's MoE block returns a partial sum (routed and shared experts); the two add up to the
    whole block's output from either expert layout: the merged gate/up rows are sliced half by half."""
    model_dir, _ = checkpoints.checkpoint(architecture)
    if layout == "fused":
        model_dir = fused_layout(model_dir, tmp_path / "fused")
    whole = build_model(model_dir, torch.float32, 64)
    block = whole.model.layers[0].ffn_name
    x = torch.randn(7, whole.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    partials = []
    for rank in (0, 1):
        shard = getattr(build_model(model_dir, torch.float32, 64, tp=TensorParallel(rank, 2)).model.layers[0], block)
        shard.tp = TensorParallel()  # the block's all-reduce left out: the test adds the partials
        partials.append(shard(x))
    assert relative_error(partials[0] + partials[1], getattr(whole.model.layers[0], block)(x)) < 1e-5


@pytest.mark.parametrize(
    ("architecture", "overrides", "what"),
    [
        ("Qwen3MoeForCausalLM", dict(moe_intermediate_size=31), "expert intermediate size 31"),
        ("Qwen2MoeForCausalLM", dict(shared_expert_intermediate_size=47), "shared expert intermediate size 47"),
    ],
)
def test_tensor_parallel_experts_that_do_not_divide_are_refused(checkpoints, tmp_path, architecture, overrides, what):
    model_dir, _ = checkpoints.checkpoint(architecture, **overrides)
    with pytest.raises(OptionsError, match=rf"^--tp 2: {architecture}'s {what} is not divisible by 2$"):
        xllm_compiler.compile(model_dir, tmp_path / "out", tp=2)
    assert not (tmp_path / "out").exists()


def test_onnx_export_of_an_moe_artifact_is_refused(checkpoints, tmp_path):
    pytest.importorskip("onnxscript")
    artifact = checkpoints.artifact(checkpoints.checkpoint("MixtralForCausalLM")[0])
    with pytest.raises(OptionsError, match=r"^op xllm\.fused_moe\.default has no ONNX form yet"):
        xllm_compiler.export_onnx(artifact, tmp_path / "m.onnx", "decode", 1)


@pytest.mark.parametrize("planned", [False, True], ids=["contiguous", "placement-plan"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_expert_parallel_partial_sums_add_up_to_the_whole(checkpoints, architecture, planned):
    """Each --ep 2 rank's routed experts (its own slots, a replica of each hot expert with a plan) return a
    partial sum over the (token, expert) pairs its table gives it; the two add up to the whole op's output."""
    from xllm_compiler.experts.placement import plan_placement
    from xllm_compiler.models.parallel import ExpertParallel

    model_dir, _ = checkpoints.checkpoint(architecture)
    whole = build_model(model_dir, torch.float32, 64)
    moe = whole.spec.moe
    block = getattr(whole.model.layers[0], whole.model.layers[0].ffn_name)
    x = torch.randn(7, whole.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    weights, ids = route_topk(block.gate(x), moe.top_k, moe.renormalise)
    slots = torch.arange(1, 8) * 3  # KV slots pick each token's replica
    load = [[int(c) for c in torch.bincount(ids.flatten(), minlength=moe.num_experts)]] * sum(moe.sparse_layers)
    placement = plan_placement(load, ranks=2, redundant=2) if planned else None
    expected = torch.ops.xllm.moe_experts(x, weights, ids, block.experts.gate_up_proj, block.experts.down_proj)
    partials = []
    for rank in (0, 1):
        parallel = TensorParallel(ep=ExpertParallel(rank, 2, placement))
        shard = build_model(model_dir, torch.float32, 64, tp=parallel)
        mine = getattr(shard.model.layers[0], shard.model.layers[0].ffn_name)
        local = (mine.experts.gate_up_proj, mine.experts.down_proj, mine.expert_table, mine.columns)
        partials.append(torch.ops.xllm.moe_experts(x, weights, ids, *local, None, slots))
        assert mine.experts.gate_up_proj.shape[0] == (moe.num_experts + (2 if planned else 0)) // 2
    assert relative_error(partials[0] + partials[1], expected) < 1e-5


def test_an_expert_parallel_rank_reads_only_its_own_experts(checkpoints, monkeypatch):
    """Built for --ep 2, rank 1 reads the per-expert tensors of its slots and no others (each rank holding
    every expert would cost N copies of them at compile time)."""
    from xllm_compiler.models.parallel import ExpertParallel
    from xllm_compiler.models.weights import Checkpoint

    model_dir, _ = checkpoints.checkpoint("Qwen3MoeForCausalLM")
    read: list[str] = []
    load = Checkpoint.load
    monkeypatch.setattr(Checkpoint, "load", lambda self, name, *args: read.append(name) or load(self, name, *args))
    model = build_model(model_dir, torch.float32, 64, tp=TensorParallel(ep=ExpertParallel(1, 2)))
    experts = {int(name.split(".experts.")[1].split(".")[0]) for name in read if ".experts." in name}
    num_experts = model.spec.moe.num_experts
    assert experts == set(range(num_experts // 2, num_experts))
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == num_experts // 2
