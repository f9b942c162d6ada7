"""fold_constants: weight-only subgraphs (the merged projections) become stored weights, never larger ones."""

from __future__ import annotations

import pytest
import torch

from tests.passes.graphs import ARCHITECTURES, DEPTHS, aten
from xllm_compiler.passes.cleanup.fold_constants import fold_constants
from xllm_compiler.testing import assert_close, check_pass, code, count, run, trace


@pytest.mark.parametrize("num_layers", DEPTHS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_folds_the_merged_projection_weights(architecture, num_layers):
    layers = num_layers
    bias = architecture == "Qwen2ForCausalLM"
    merged = layers * (3 if bias else 2)  # qkv weight and gate_up weight per layer, and Qwen2's qkv bias
    checks = check_pass(
        fold_constants,
        architecture,
        merged,
        num_layers=num_layers,
        ops_before={aten.cat.default: 2 * layers + merged},
        ops_after={aten.cat.default: 2 * layers},  # rotary's rotate_half cats read activations
    )
    for check in checks:
        stored = set(dict(check.graph.named_buffers())) | set(dict(check.graph.named_parameters()))
        for i in range(num_layers):
            prefix = f"model.layers.{i}"
            assert {f"{prefix}.self_attn.qkv_proj.weight", f"{prefix}.mlp.gate_up_proj.weight"} <= stored
            assert (f"{prefix}.self_attn.qkv_proj.bias" in stored) == bias
            assert not any(
                f"{prefix}.{name}.weight" in stored
                for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
            )


def _stored(gm):
    return dict(gm.named_buffers())


def test_folds_a_weight_chain_into_one_weight_under_the_name_asked_for():
    a, b = torch.randn(4, 8), torch.randn(2, 8)

    def fn(x):
        return x @ torch.cat([a, b]).t()

    x = torch.randn(3, 8)
    gm = trace(fn, x, weights={"proj.a": a, "proj.b": b})
    [cat] = [n for n in gm.graph.nodes if n.target is aten.cat.default]
    cat.meta["constant_name"] = "proj.merged.weight"
    expected = run(gm, x)

    result = fold_constants(gm)

    assert result.matches == 2  # the cat, then the transpose of what it became
    assert count(gm, aten.cat.default) == count(gm, aten.t.default) == 0
    stored = _stored(gm)
    assert "proj.a" not in stored and "proj.b" not in stored
    assert "proj.merged.weight" not in stored, "the transpose reads it, so it was folded further"
    [name] = [n for n in stored if n.startswith("folded.")]
    torch.testing.assert_close(stored[name], torch.cat([a, b]).t())
    assert stored[name].is_contiguous()
    assert_close(run(gm, x), expected, torch.float32)


def test_stores_a_merged_weight_under_its_constant_name():
    a, b = torch.randn(4, 8), torch.randn(2, 8)
    x = torch.randn(3, 8)
    gm = trace(lambda x: torch.nn.functional.linear(x, torch.cat([a, b])), x, weights={"q.weight": a, "k.weight": b})
    [cat] = [n for n in gm.graph.nodes if n.target is aten.cat.default]
    cat.meta["constant_name"] = "attn.qkv_proj.weight"
    expected = run(gm, x)

    assert fold_constants(gm).matches == 1
    assert set(_stored(gm)) == {"attn.qkv_proj.weight"}
    [attr] = [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert attr.target == "attn.qkv_proj.weight" and attr.meta["val"].shape == (6, 8)
    assert_close(run(gm, x), expected, torch.float32)


def test_never_grows_memory():
    weight = torch.randn(8)
    gm = trace(lambda x: x + weight.expand(4, 8), torch.randn(4, 8), weights={"w": weight})
    before = code(gm)
    result = fold_constants(gm)
    assert not result and result.matches == 0
    assert code(gm) == before
    assert set(_stored(gm)) == {"w"}


def test_leaves_activations_and_impure_ops_alone():
    weight = torch.randn(4, 8)
    gm = trace(lambda x: (x * weight, torch.rand_like(weight)), torch.randn(4, 8), weights={"w": weight})
    before = code(gm)
    assert fold_constants(gm).matches == 0
    assert code(gm) == before
