"""The fused C++ kernels (ops/cpu_kernels.cpp) against the torch composites they replace on CPU.

The runtime calls the native kernel where it was built, so the model-level parity tests exercise only
that path; here each kernel is checked against its composite directly, in every dtype, on the layouts
the graphs hand it (strided query/key views of the merged QKV output, GQA, sliding windows).
"""

from __future__ import annotations

import pytest
import torch

from xllm_compiler.ops import KERNELS, native
from xllm_compiler.ops.attention import _attend_decode_batch

pytestmark = pytest.mark.skipif(native.native_kernels() is None, reason="no C++ toolchain: composites only")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
#: Both sides round every materialised intermediate to the dtype, but float sums are ordered
#: differently (a vector reduction here, torch's there): one rounding step of slack in 16-bit dtypes.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    tol = TOLERANCE[actual.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol)


def run_both(name: str, inputs: tuple, outputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run op ``name``'s composite and native out kernels into fresh copies of ``outputs``."""
    composite = [torch.full_like(o, float("nan")) for o in outputs]
    fused = [torch.full_like(o, float("nan")) for o in outputs]
    KERNELS[name](*inputs, *composite)
    native.native_cpu_kernels()[name](*inputs, *fused)
    return composite, fused


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_rms_norm(dtype, rows):
    x, weight = torch.randn(rows, 96, dtype=dtype), torch.randn(96, dtype=dtype)
    out = torch.empty_like(x)
    composite, fused = run_both("xllm::rms_norm_out", (x, weight, 1e-6), [out])
    close(fused[0], composite[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_returns_the_sum_and_its_norm(dtype):
    x, residual, weight = torch.randn(5, 64, dtype=dtype), torch.randn(5, 64, dtype=dtype), torch.randn(64, dtype=dtype)
    composite, fused = run_both("xllm::fused_add_rms_norm_out", (x, residual, weight, 1e-5), [x, x])
    torch.testing.assert_close(fused[1], composite[1], rtol=0, atol=0)  # the sum is one rounding: exact
    close(fused[0], composite[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    gate_up = torch.randn(9, 2 * 80, dtype=dtype) * 4
    composite, fused = run_both("xllm::silu_and_mul_out", (gate_up,), [torch.empty(9, 80, dtype=dtype)])
    close(fused[0], composite[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_on_strided_views_of_merged_qkv(dtype):
    tokens, heads, kv_heads, dim = 6, 4, 2, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype)
    query = qkv[:, : heads * dim].view(tokens, heads, dim)
    key = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    assert not query.is_contiguous()
    angles = torch.randn(tokens, dim // 2).repeat(1, 2)
    cos, sin = angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]  # [T, 1, D]
    outputs = [torch.empty(tokens, heads, dim, dtype=dtype), torch.empty(tokens, kv_heads, dim, dtype=dtype)]
    composite, fused = run_both("xllm::rotary_embedding_out", (query, key, cos, sin), outputs)
    for got, want in zip(fused, composite, strict=True):
        close(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [0, 5])
def test_decode_attention_reads_the_paged_cache_in_place(dtype, window):
    blocks, block_size, heads, kv_heads, dim = 12, 4, 6, 2, 8
    kv_cache = torch.randn(2, blocks, block_size, kv_heads, dim, dtype=dtype)
    lengths = [1, 9, 16]
    # Non-consecutive, shuffled blocks per sequence, as the pool hands them out.
    tables = torch.tensor([[7, 0, 0, 0], [3, 11, 1, 0], [2, 9, 5, 10]], dtype=torch.int32)
    merged = torch.randn(len(lengths), (heads + 2) * dim, dtype=dtype)
    query = merged[:, : heads * dim].view(len(lengths), heads, dim)  # strided rows
    scale = dim**-0.5
    expected = _attend_decode_batch(query, kv_cache, tables, lengths, scale, window)
    out = torch.full((len(lengths), heads, dim), float("nan"), dtype=dtype)
    native.native_kernels().decode_attention(
        query, kv_cache, tables, torch.tensor(lengths, dtype=torch.int64), scale, window, out
    )
    close(out, expected)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("XLLM_NATIVE_KERNELS", "0")
    assert native.native_kernels.__wrapped__() is None
