"""fuse_rotary_embedding: the rotate-half rotary of q and k becomes one xllm::rotary_embedding."""

from __future__ import annotations

import pytest
import torch

from tests.passes.graphs import ARCHITECTURES, DEPTHS, aten, xllm
from xllm_compiler.ops import reference
from xllm_compiler.passes.fusion.fuse_rotary_embedding import fuse_rotary_embedding
from xllm_compiler.testing import assert_close, check_meta, check_pass, cleanup, code, count, run, trace


@pytest.mark.parametrize("num_layers", DEPTHS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fuses_q_and_k_of_every_layer(architecture, num_layers):
    layers = num_layers
    check_pass(
        fuse_rotary_embedding,
        architecture,
        layers,
        num_layers=num_layers,
        # rotate_half is a neg, a cat and two slices, for q and for k.
        ops_before={aten.neg.default: 2 * layers, aten.cat.default: 2 * layers, aten.slice.Tensor: 4 * layers},
        ops_after={
            aten.neg.default: 0,
            aten.cat.default: 0,
            aten.slice.Tensor: 0,
            aten.mul.Tensor: 0,
            xllm.rotary_embedding.default: layers,
        },
    )


def _inputs(heads=4, kv_heads=2, head_dim=8, tokens=5, dtype=torch.float32):
    return (
        torch.randn(tokens, heads, head_dim, dtype=dtype),
        torch.randn(tokens, kv_heads, head_dim, dtype=dtype),
        torch.randn(tokens, 1, head_dim, dtype=dtype),
        torch.randn(tokens, 1, head_dim, dtype=dtype),
    )


def _rotary(q, k, cos, sin):
    return reference.apply_rotary(q, cos, sin), reference.apply_rotary(k, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [2, 6, 64])
def test_fuses_any_head_size(head_dim, dtype):
    # The pattern is traced with head_dim 16: rotate_half's split point must follow the graph's.
    inputs = _inputs(head_dim=head_dim, dtype=dtype)
    gm = cleanup(trace(_rotary, *inputs))
    expected = run(gm, *inputs)

    assert fuse_rotary_embedding(gm).matches == 1
    assert count(gm, aten.cat.default) == count(gm, aten.neg.default) == 0
    assert_close(run(gm, *inputs), expected, dtype)
    check_meta(gm, *inputs)


def test_declines_when_q_and_k_use_different_cos_and_sin():
    inputs = (*_inputs(), torch.randn(5, 1, 8), torch.randn(5, 1, 8))

    def fn(q, k, cos, sin, cos_k, sin_k):
        return reference.apply_rotary(q, cos, sin), reference.apply_rotary(k, cos_k, sin_k)

    gm = cleanup(trace(fn, *inputs))
    before = code(gm)
    assert fuse_rotary_embedding(gm).matches == 0
    assert code(gm) == before


def test_declines_a_lone_rotation():
    q, _, cos, sin = _inputs()
    gm = cleanup(trace(reference.apply_rotary, q, cos, sin))
    before = code(gm)
    assert fuse_rotary_embedding(gm).matches == 0
    assert code(gm) == before


def test_declines_a_rotation_that_does_not_split_at_half():
    def rotate_at(x, cos, sin, split):
        rotated = torch.cat((-x[..., split:], x[..., :split]), dim=-1)
        return x * cos + rotated * sin

    inputs = _inputs(head_dim=8)
    gm = cleanup(trace(lambda q, k, cos, sin: (rotate_at(q, cos, sin, 3), rotate_at(k, cos, sin, 3)), *inputs))
    before = code(gm)
    assert fuse_rotary_embedding(gm).matches == 0
    assert code(gm) == before


def test_declines_when_the_rotated_half_has_another_user():
    def fn(q, k, cos, sin):
        half = q.shape[-1] // 2
        rotated = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
        return q * cos + rotated * sin, reference.apply_rotary(k, cos, sin), rotated

    inputs = _inputs()
    gm = cleanup(trace(fn, *inputs))
    assert fuse_rotary_embedding(gm).matches == 0
