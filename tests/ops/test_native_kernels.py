"""The fused C++ kernels (ops/cpu_kernels.cpp) against the torch composites they replace on CPU.

The runtime calls the native kernel where it was built, so the model-level parity tests exercise only
that path; here each kernel is checked against its composite directly, in every dtype, on the layouts
the graphs hand it (strided query/key views of the merged QKV output, GQA, sliding windows).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xllm_compiler.ops import KERNELS, native
from xllm_compiler.ops.attention import _attend_decode_batch, write_kv_cache_kernel

pytestmark = pytest.mark.skipif(native.native_kernels() is None, reason="no C++ toolchain: composites only")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
#: Both sides round every materialised intermediate to the dtype, but float sums are ordered
#: differently (a vector reduction here, torch's there): one rounding step of slack in 16-bit dtypes.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def packed_dtype_names() -> list[str]:
    module = native.native_kernels()
    return module.packed_linear_dtypes() if module is not None else []


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
@pytest.mark.parametrize("width", [80, 37])  # whole 16-lane vectors; a scalar tail
def test_silu_and_mul(dtype, width):
    gate_up = torch.randn(9, 2 * width, dtype=dtype) * 4
    composite, fused = run_both("xllm::silu_and_mul_out", (gate_up,), [torch.empty(9, width, dtype=dtype)])
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


def decode_step(dtype, heads=6, kv_heads=2, dim=8, block_size=4):
    """A decode step of three sequences (contexts 1, 9, 16 after this token) plus one padding token, over
    shuffled, non-consecutive blocks; query/key/value are strided views of one merged QKV output."""
    lengths = [1, 9, 16]
    tables = torch.tensor([[7, 0, 0, 0], [3, 11, 1, 0], [2, 9, 5, 10], [0, 0, 0, 0]], dtype=torch.int32)
    kv_cache = torch.randn(2, 12, block_size, kv_heads, dim, dtype=dtype)
    merged = torch.randn(len(lengths) + 1, (heads + 2 * kv_heads) * dim, dtype=dtype)
    query = merged[:, : heads * dim].view(-1, heads, dim)
    key = merged[:, heads * dim : (heads + kv_heads) * dim].view(-1, kv_heads, dim)
    value = merged[:, (heads + kv_heads) * dim :].view(-1, kv_heads, dim)
    positions = [n - 1 for n in lengths]
    slots = [int(tables[s, p // block_size]) * block_size + p % block_size for s, p in enumerate(positions)]
    metadata = dict(
        slot_mapping=torch.tensor([*slots, 0]),  # the padding token writes the reserved slot 0
        query_lens=torch.tensor([1, 1, 1, 0], dtype=torch.int32),
        seq_lens=torch.tensor([*lengths, 0], dtype=torch.int32),
        block_tables=tables,
    )
    return (query, key, value, kv_cache), metadata, lengths


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("dim", [8, 64, 128])  # 64 and 128: the register-resident heads of AVX-512 builds
def test_paged_decode_stores_then_attends_in_place(dtype, window, dim):
    (query, key, value, kv_cache), metadata, lengths = decode_step(dtype, dim=dim)
    scale = query.shape[-1] ** -0.5
    expected_cache = kv_cache.clone()
    write_kv_cache_kernel(key, value, expected_cache, metadata["slot_mapping"])
    expected = _attend_decode_batch(query[:3], expected_cache, metadata["block_tables"][:3], lengths, scale, window)

    out = torch.full(query.shape, float("nan"), dtype=dtype)
    handled = native.native_kernels().paged_decode_out(
        query, key, value, kv_cache, *metadata.values(), scale, window, out, 0
    )
    assert handled
    assert torch.equal(kv_cache, expected_cache)
    close(out[:3], expected)
    assert out[3].eq(0).all()  # the padding token's row


def test_paged_decode_declines_a_prefill_and_touches_nothing():
    (query, key, value, kv_cache), metadata, _ = decode_step(torch.float32)
    metadata["query_lens"] = torch.tensor([2, 1, 1, 0], dtype=torch.int32)  # sequence 0 has two new tokens
    before = kv_cache.clone()
    out = torch.full(query.shape, float("nan"))
    assert not native.native_kernels().paged_decode_out(query, key, value, kv_cache, *metadata.values(), 1.0, 0, out, 0)
    assert torch.equal(kv_cache, before) and out.isnan().all()


def test_paged_decode_takes_the_second_half_of_a_split_step():
    """A micro-batch of rows [2, 4) of the step: sequence 2's token and the padding token."""
    (query, key, value, kv_cache), metadata, lengths = decode_step(torch.float32)
    expected_cache = kv_cache.clone()
    write_kv_cache_kernel(key[2:], value[2:], expected_cache, metadata["slot_mapping"][2:])
    expected = _attend_decode_batch(query[2:3], expected_cache, metadata["block_tables"][2:3], lengths[2:], 0.5, 0)
    out = torch.full((2, *query.shape[1:]), float("nan"))
    metadata["slot_mapping"] = metadata["slot_mapping"][2:]
    assert native.native_kernels().paged_decode_out(
        query[2:], key[2:], value[2:], kv_cache, *metadata.values(), 0.5, 0, out, 2
    )
    assert torch.equal(kv_cache, expected_cache)
    close(out[:1], expected)
    assert out[1].eq(0).all()


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("XLLM_NATIVE_KERNELS", "0")
    assert native.native_kernels.__wrapped__() is None


def close_to_float(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """One rounding of a float sum, against float math: within one 16-bit rounding step of the largest value."""
    tol = TOLERANCE[actual.dtype]
    torch.testing.assert_close(actual.float(), expected, rtol=tol, atol=tol * expected.abs().max().item())


PACKED_DTYPES = [d for d in (torch.float32, torch.bfloat16) if str(d).removeprefix("torch.") in packed_dtype_names()]


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 64])
@pytest.mark.parametrize(("outputs", "inputs"), [(7, 5), (64, 96), (100, 97), (130, 768)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_linear(dtype, rows, outputs, inputs, with_bias):
    """Partial blocks of 64 outputs, partial tiles of 6 rows, odd K (a half pair in bfloat16), bias."""
    native_module = native.native_kernels()
    x, weight = torch.randn(rows, inputs, dtype=dtype), torch.randn(outputs, inputs, dtype=dtype)
    bias = torch.randn(outputs, dtype=dtype) if with_bias else None
    packed = native_module.pack_linear_weight(weight)
    out = torch.full((rows, outputs), float("nan"), dtype=dtype)
    assert native_module.packed_linear_out(x, packed, bias, out) is out
    expected = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    close_to_float(out, expected)
    allocated = native_module.packed_linear(x, packed, bias, outputs)
    torch.testing.assert_close(allocated, out, rtol=0, atol=0)
    if dtype == torch.bfloat16:  # the LM head's form, its float32 cast inside: bit for bit the cast's values
        logits = native_module.packed_linear_float(x, packed, bias, outputs)
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, out.float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
def test_packed_linear_float_takes_bfloat16_only(dtype):
    native_module = native.native_kernels()
    x, weight = torch.randn(2, 8, dtype=dtype), torch.randn(4, 8, dtype=dtype)
    packed = native_module.pack_linear_weight(weight)
    if dtype == torch.bfloat16:
        assert native_module.packed_linear_float(x[None], packed, None, 4).shape == (1, 2, 4)
    else:
        with pytest.raises(RuntimeError, match="packed_linear_float takes bfloat16 input"):
            native_module.packed_linear_float(x, packed, None, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_rows_is_index_select(dtype):
    """select_rows_out, the replay program's form of index_select.out over dim 0 (runtime/cpu_replay.py)."""
    native_module = native.native_kernels()
    table = torch.randn(10, 40, dtype=dtype)[:, 3:35]  # rows 40 apart
    index = torch.tensor([9, 0, 3, 3])
    out = torch.full((4, 32), float("nan"), dtype=dtype)
    native_module.select_rows_out(table, index, out)
    torch.testing.assert_close(out, table.index_select(0, index), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="index 10 is out of range for 10 rows"):
        native_module.select_rows_out(table, torch.tensor([1, 10, 2, 2]), out)
    with pytest.raises(RuntimeError, match="out must be a contiguous"):
        native_module.select_rows_out(table, index, out[:2])


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
def test_packed_linear_reads_strided_rows(dtype):
    merged = torch.randn(3, 200, dtype=dtype)
    x = merged[:, 40:136]  # rows 200 apart, as a slice of a merged projection's output
    weight = torch.randn(33, 96, dtype=dtype)
    out = torch.empty(3, 33, dtype=dtype)
    native.native_kernels().packed_linear_out(x, native.native_kernels().pack_linear_weight(weight), None, out)
    expected = F.linear(x.float(), weight.float())
    close_to_float(out, expected)
