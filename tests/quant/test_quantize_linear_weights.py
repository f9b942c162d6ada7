"""quantize_linear_weights: match counts as a function of depth, what the graph and its weights become, numerics.

The pass changes results by design, so the numerics are bounded by int8 rounding, not --verify's 1e-4:
per-channel weights are off by at most half a step (1/254 of their row's largest magnitude), which moves
a tiny random model's logits by well under 5% of the largest logit (measured: about 1%). int4 has 15 steps
over each group's [min, max] instead of 254 over [-amax, amax], so about 8x coarser steps: measured 6.9% to
8.9% of the largest logit (Llama and Qwen2, 1 and 2 layers, float32 and bfloat16, groups of 32, 64 and 128;
the tiny models' rows of 64 make 64 and 128 one group), bounded at 15%.
"""

from __future__ import annotations

import pytest
import torch

from tests.passes.graphs import cached_build_graph, model_graph
from xllm_compiler.passes import PassManager, default_pipeline
from xllm_compiler.passes.quant.quantize_linear_weights import QuantizeLinearWeights, QuantizeOptions
from xllm_compiler.passes.verify import run_steps, sample_steps
from xllm_compiler.testing import op_counts, tiny_config

aten, xllm = torch.ops.aten, torch.ops.xllm
LOGIT_TOLERANCE = 0.05  # of the largest logit
INT4_LOGIT_TOLERANCE = 0.15


def _prepared(architecture: str, layers: int, dtype: torch.dtype = torch.float32) -> torch.fx.GraphModule:
    """The model graph after every pass before quantization (merged projections folded into weights)."""
    gm = model_graph(architecture, layers, dtype)
    pipeline = default_pipeline()
    names = [p.name for p in pipeline]
    PassManager(pipeline[: names.index("quantize_linear_weights")]).run(gm)
    return gm


def _relative_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(float((o - r).abs().max() / r.abs().max()) for o, r in zip(outputs, reference, strict=True))


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
@pytest.mark.parametrize("layers", [1, 2])
def test_every_linear_becomes_linear_w8(architecture, layers):
    gm = _prepared(architecture, layers)
    steps, caches = sample_steps(gm)
    reference = run_steps(gm, steps, caches)
    assert op_counts(gm)[aten.linear.default] == 4 * layers + 1  # qkv, o, gate_up, down per layer + lm_head
    result = QuantizeLinearWeights(QuantizeOptions("int8"))(gm)
    gm.graph.lint()
    gm.recompile()
    counts = op_counts(gm)
    assert result.matches == 4 * layers + 1 and counts[xllm.linear_w8.default] == 4 * layers + 1
    assert counts[aten.linear.default] == 0
    buffers = dict(gm.named_buffers())
    int8 = [name for name, t in buffers.items() if t.dtype == torch.int8]
    assert len(int8) == 4 * layers + 1 and all(name.endswith("_int8") for name in int8)
    assert all(buffers[name.removesuffix("_int8") + "_scale"].dtype == torch.float32 for name in int8)
    float_2d = [n for n, t in [*buffers.items(), *gm.named_parameters()] if t.dim() == 2 and t.is_floating_point()]
    assert all("embed_tokens" in n or "rope" in n for n in float_2d), float_2d  # no float linear weight is kept
    assert _relative_error(run_steps(gm, steps, caches), reference) <= LOGIT_TOLERANCE


def test_the_lm_head_can_stay_float():
    gm = _prepared("LlamaForCausalLM", 2)
    result = QuantizeLinearWeights(QuantizeOptions("int8", lm_head=False))(gm)
    counts = op_counts(gm)
    assert result.matches == 8 and counts[xllm.linear_w8.default] == 8 and counts[aten.linear.default] == 1
    (head,) = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    assert head.args[1].target == "lm_head.weight"


def test_bfloat16_graph_within_tolerance():
    gm = _prepared("LlamaForCausalLM", 2, torch.bfloat16)
    steps, caches = sample_steps(gm)
    reference = run_steps(gm, steps, caches)
    assert QuantizeLinearWeights(QuantizeOptions("int8"))(gm).matches == 9
    gm.recompile()
    assert _relative_error(run_steps(gm, steps, caches), reference) <= LOGIT_TOLERANCE


def test_declines_without_a_scheme_and_on_computed_weights():
    gm = _prepared("LlamaForCausalLM", 1)
    before = op_counts(gm)
    assert not QuantizeLinearWeights()(gm) and op_counts(gm) == before
    unmerged = model_graph("LlamaForCausalLM", 1)  # before fold_constants a merged weight is still a cat
    PassManager([p for p in default_pipeline() if p.name in ("merge_qkv_projections",)]).run(unmerged)
    result = QuantizeLinearWeights(QuantizeOptions("int8"))(unmerged)
    assert result.matches == 5  # o, gate, up, down, lm_head on stored weights; the merged qkv is computed
    assert op_counts(unmerged)[aten.linear.default] == 1


def test_the_options_are_in_the_pass_identity():
    identities = {QuantizeLinearWeights(o).identity() for o in (None, QuantizeOptions("int8"))}
    identities.add(QuantizeLinearWeights(QuantizeOptions("int8", lm_head=False)).identity())
    assert len(identities) == 3


def test_a_tied_lm_head_is_quantized_and_the_embedding_keeps_its_float_table():
    gm = cached_build_graph(tiny_config("LlamaForCausalLM", num_hidden_layers=1, tie_word_embeddings=True))
    pipeline = default_pipeline()
    PassManager(pipeline[: [p.name for p in pipeline].index("quantize_linear_weights")]).run(gm)
    assert QuantizeLinearWeights(QuantizeOptions("int8"))(gm).matches == 5
    reads = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {"lm_head.weight", "lm_head.weight_int8"} <= reads  # torch.export names the shared table lm_head.weight
    (gather,) = [n for n in gm.graph.nodes if n.target is aten.embedding.default]
    assert gather.args[0].target == "lm_head.weight"


def test_an_unknown_scheme_or_group_size_is_refused_by_name():
    with pytest.raises(ValueError, match="no scheme 'int3'"):
        QuantizeOptions("int3")
    with pytest.raises(ValueError, match=r"no group size 48 \(known: 32, 64, 128\)"):
        QuantizeOptions("int4", group_size=48)


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("layers", [1, 2])
def test_int4_rewrites_every_linear_into_linear_w4(layers, group_size):
    gm = _prepared("LlamaForCausalLM", layers)
    steps, caches = sample_steps(gm)
    reference = run_steps(gm, steps, caches)
    weights = {n.args[1].target: n.args[1].meta["val"].shape for n in gm.graph.nodes if n.target is aten.linear.default}
    result = QuantizeLinearWeights(QuantizeOptions("int4", group_size=group_size))(gm)
    gm.graph.lint()
    gm.recompile()
    counts = op_counts(gm)
    assert result.matches == 4 * layers + 1 and counts[xllm.linear_w4.default] == 4 * layers + 1
    assert counts[aten.linear.default] == 0 and counts[xllm.linear_w8.default] == 0
    assert {n.args[4] for n in gm.graph.nodes if n.target is xllm.linear_w4.default} == {group_size}
    buffers = dict(gm.named_buffers())
    int4 = [name for name, t in buffers.items() if t.dtype == torch.uint8]
    assert len(int4) == 4 * layers + 1 and all(name.endswith("_int4") for name in int4)
    for name in int4:
        rows, k_size = weights[name.removesuffix("_int4")]
        groups = -(-k_size // group_size)
        assert buffers[name].shape == (rows, -(-k_size // 2))
        for suffix in ("_scale", "_offset"):
            companion = buffers[name.removesuffix("_int4") + suffix]
            assert companion.dtype == torch.float32 and companion.shape == (rows, groups)
    float_2d = [n for n, t in [*buffers.items(), *gm.named_parameters()] if t.dim() == 2 and t.is_floating_point()]
    assert all("embed_tokens" in n or "rope" in n or n.endswith(("_scale", "_offset")) for n in float_2d), float_2d
    assert _relative_error(run_steps(gm, steps, caches), reference) <= INT4_LOGIT_TOLERANCE


def test_int4_lm_head_can_stay_float_and_bfloat16_within_tolerance():
    gm = _prepared("LlamaForCausalLM", 2, torch.bfloat16)
    steps, caches = sample_steps(gm)
    reference = run_steps(gm, steps, caches)
    result = QuantizeLinearWeights(QuantizeOptions("int4", lm_head=False, group_size=64))(gm)
    gm.recompile()
    counts = op_counts(gm)
    assert result.matches == 8 and counts[xllm.linear_w4.default] == 8 and counts[aten.linear.default] == 1
    assert _relative_error(run_steps(gm, steps, caches), reference) <= INT4_LOGIT_TOLERANCE


def test_the_group_size_is_in_the_pass_identity():
    identities = {QuantizeLinearWeights(QuantizeOptions("int4", group_size=g)).identity() for g in (32, 64, 128)}
    identities.add(QuantizeLinearWeights(QuantizeOptions("int8")).identity())
    assert len(identities) == 4
