"""Property tests: random small graphs around each pattern (random shapes, eps, dtype, surrounding ops,
intermediates that escape) are fused exactly where the pattern occurs, and compute what they did before.

Each graph is a chain of pattern instances, each wrapped in random extra ops: a scale, an added constant,
a second use of its input; an instance whose intermediate is also returned must be declined, so the
expected match count is the number of instances without one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.passes.graphs import aten
from xllm_compiler.ops import reference
from xllm_compiler.passes.fusion.fuse_add_rms_norm import fuse_add_rms_norm
from xllm_compiler.passes.fusion.fuse_rms_norm import fuse_rms_norm
from xllm_compiler.passes.fusion.fuse_rotary_embedding import fuse_rotary_embedding
from xllm_compiler.passes.fusion.fuse_silu_and_mul import fuse_silu_and_mul
from xllm_compiler.testing import assert_close, check_meta, cleanup, run, trace

PROPERTY = settings(
    max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)

tokens = st.integers(1, 9)
even = st.integers(1, 32).map(lambda n: 2 * n)
dtypes = st.sampled_from([torch.float32, torch.bfloat16])
epsilons = st.floats(1e-8, 1e-2, allow_nan=False, allow_infinity=False)
extra = st.sampled_from(["none", "scale", "shift", "reuse"])  # an op around an instance


@st.composite
def instances(draw, **fields):
    """1 to 3 instances, each with its own random fields and its own extra ops before and after."""
    count = draw(st.integers(1, 3))
    return [
        {
            "before": draw(extra),
            "after": draw(extra),
            "escape": draw(st.booleans()),
            **{k: draw(v) for k, v in fields.items()},
        }
        for _ in range(count)
    ]


def around(x, kind, side_outputs):
    """One random extra op on ``x``; 'reuse' uses x a second time, as another output of the graph."""
    if kind == "scale":
        return x * 1.5
    if kind == "shift":
        return x + 0.25
    if kind == "reuse":
        side_outputs.append(x * 2)
    return x


def check(fn, inputs, weights, fusion, expected_matches, dtype):
    gm = cleanup(trace(fn, *inputs, weights=weights))
    expected = run(gm, *inputs)
    result = fusion(gm)
    gm.graph.lint()
    assert result.matches == expected_matches
    assert_close(run(gm, *inputs), expected, dtype)
    check_meta(gm, *inputs)
    return gm


def _norm_with(x, weight, eps, escape, side_outputs):
    """reference.rms_norm; with ``escape``, the same arithmetic written out, its rsqrt also returned."""
    if not escape:
        return reference.rms_norm(x, weight, eps)
    h = x.to(torch.float32)
    inverse = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    side_outputs.append(inverse)
    return weight * (h * inverse).to(x.dtype)


@PROPERTY
@given(tokens, even, dtypes, instances(eps=epsilons))
def test_rms_norm_chains(num_tokens, hidden, dtype, chain):
    weights = {f"norm{i}.weight": torch.randn(hidden, dtype=dtype) for i in range(len(chain))}

    def fn(x):
        side: list[torch.Tensor] = []
        for i, norm in enumerate(chain):
            x = around(x, norm["before"], side)
            x = _norm_with(x, weights[f"norm{i}.weight"], norm["eps"], norm["escape"], side)
            x = around(x, norm["after"], side)
        return x, *side

    inputs = (torch.randn(num_tokens, hidden, dtype=dtype),)
    expected = sum(not norm["escape"] for norm in chain)
    gm = check(fn, inputs, weights, fuse_rms_norm, expected, dtype)
    fused = [n.args[2] for n in gm.graph.nodes if n.target is torch.ops.xllm.rms_norm.default]
    assert fused == [norm["eps"] for norm in chain if not norm["escape"]]


@PROPERTY
@given(tokens, even, dtypes, instances(eps=epsilons, swap=st.booleans()))
def test_residual_add_norm_chains(num_tokens, hidden, dtype, chain):
    weights = {f"norm{i}.weight": torch.randn(hidden, dtype=dtype) for i in range(len(chain))}

    def fn(x, residual):
        side: list[torch.Tensor] = []
        for i, block in enumerate(chain):
            x = around(x, block["before"], side)
            h = (residual + x) if block["swap"] else (x + residual)
            y = _norm_with(h, weights[f"norm{i}.weight"], block["eps"], block["escape"], side)
            x, residual = around(y, block["after"], side), h
        return x, residual, *side

    inputs = (torch.randn(num_tokens, hidden, dtype=dtype), torch.randn(num_tokens, hidden, dtype=dtype))
    check(fn, inputs, weights, fuse_add_rms_norm, sum(not b["escape"] for b in chain), dtype)


@PROPERTY
@given(tokens, even, dtypes, instances(merged=st.booleans()))
def test_silu_and_mul_chains(num_tokens, size, dtype, chain):
    def fn(gate, up):
        side: list[torch.Tensor] = []
        for mlp in chain:
            gate = around(gate, mlp["before"], side)
            if mlp["merged"]:  # the layout merge_gate_up_projections leaves
                gate, up = aten.split_with_sizes.default(torch.cat([gate, up], -1), [size, size], -1)
            activated = F.silu(gate)
            if mlp["escape"]:
                side.append(activated)
            out = around(activated * up, mlp["after"], side)
            gate, up = out, up * 0.5
        return gate, *side

    inputs = (torch.randn(num_tokens, size, dtype=dtype), torch.randn(num_tokens, size, dtype=dtype))
    check(fn, inputs, {}, fuse_silu_and_mul, sum(not m["escape"] for m in chain), dtype)


@PROPERTY
@given(
    tokens,
    st.integers(1, 8).map(lambda n: 2 * n),
    st.integers(1, 4),
    st.integers(1, 4),
    dtypes,
    st.booleans(),
    instances(),
)
def test_rotary_chains(num_tokens, head_dim, heads, kv_heads, dtype, shared_tables, chain):
    # Layers share one cos/sin, as in a model, unless some layer is declined: then a neighbour's q or
    # k could pair with the leftover one (correctly, but the count would no longer be per layer).
    shared_tables = shared_tables and not any(layer["escape"] for layer in chain)
    tables = 1 if shared_tables else len(chain)

    def rotate(x, cos, sin, escape, side):
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        if escape:
            side.append(rotated)
        return x * cos + rotated * sin

    def fn(q, k, cos, sin):
        side: list[torch.Tensor] = []
        for i, layer in enumerate(chain):
            c, s = cos[i % tables], sin[i % tables]
            q, k = around(q, layer["before"], side), around(k, layer["before"], side)
            q = rotate(q, c, s, layer["escape"], side)
            k = reference.apply_rotary(k, c, s)
            q, k = around(q, layer["after"], side), around(k, layer["after"], side)
        return q, k, *side

    inputs = (
        torch.randn(num_tokens, heads, head_dim, dtype=dtype),
        torch.randn(num_tokens, kv_heads, head_dim, dtype=dtype),
        torch.randn(tables, num_tokens, 1, head_dim, dtype=dtype),
        torch.randn(tables, num_tokens, 1, head_dim, dtype=dtype),
    )
    check(fn, inputs, {}, fuse_rotary_embedding, sum(not layer["escape"] for layer in chain), dtype)
