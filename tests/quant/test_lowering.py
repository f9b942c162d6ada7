"""Where xllm::linear_w8 and xllm::linear_w4 run: memory planning per platform, and the NPU kernels' calling
conventions.

On CPU the op has an out form (the planner makes it write into the arena); on NPU its kernel,
npu_weight_quant_batchmatmul, has none, so it stays functional there and the NPU audit finds every op of
a quantized graph in the table. The NPU kernel is checked against a stand-in that implements torch_npu's
documented contract (x (M, K), weight (K, N) int8, per-channel scale (N,) in x's dtype, float32 bias
for bfloat16 x), which pins the argument conventions; it cannot check the device. The int4 one likewise
(signed int4 values packed by npu_convert_weight_to_int4pack into int32 (K, N/8), per-group scale and offset
(G, N) in x's dtype, dequantized as (w + offset) * scale); the stand-in packs in an order of its own, so the
device's nibble order is not checked either.
"""

from __future__ import annotations

import types

import pytest
import torch

from tests.passes.graphs import model_graph
from xllm_compiler.buckets import DECODE, Bucket
from xllm_compiler.buckets.specialize import specialize
from xllm_compiler.compiler import bucket_passes_for
from xllm_compiler.ops.quant import linear_w4_kernel, linear_w8_kernel, quantize_per_channel, quantize_per_group
from xllm_compiler.options import make_options
from xllm_compiler.passes import PassManager, default_pipeline
from xllm_compiler.passes.quant.quantize_linear_weights import QuantizeOptions
from xllm_compiler.runtime.platform import npu
from xllm_compiler.runtime.platform.lowering import NPU_LOWERING, composite_lowering
from xllm_compiler.testing import op_counts

xllm = torch.ops.xllm


def _planned(lowering, block_size: int, scheme: str = "int8") -> torch.fx.GraphModule:
    gm = model_graph("Qwen2ForCausalLM", 1)  # QKV bias: linear_w8 with a bias too
    PassManager(default_pipeline(QuantizeOptions(scheme, group_size=32))).run(gm)
    bucket = specialize(gm, Bucket(DECODE, 4, 4))
    PassManager(bucket_passes_for(make_options(block_size=block_size), lowering)).run(bucket)
    return bucket


def test_cpu_plans_linear_w8_into_the_arena():
    counts = op_counts(_planned(composite_lowering("cpu"), 16))
    # The LM head's result is the graph's output (a float32 model has no cast after it): not an arena buffer.
    assert counts[xllm.linear_w8_out.default] == 4 and counts[xllm.linear_w8.default] == 1


def test_npu_plan_keeps_linear_w8_functional_and_fully_lowered():
    planned = _planned(NPU_LOWERING, 128)
    assert NPU_LOWERING.unlowered(planned.graph) == []
    counts = op_counts(planned)
    assert counts[xllm.linear_w8.default] == 5 and counts[xllm.linear_w8_out.default] == 0


def _documented_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None, bias=None, **_):
    """torch_npu.npu_weight_quant_batchmatmul's documented per-channel contract, in torch."""
    assert x.dim() == 2 and weight.dtype == torch.int8 and weight.shape[0] == x.shape[1]
    assert antiquant_scale.shape == (weight.shape[1],) and antiquant_scale.dtype == x.dtype
    assert bias is None or bias.dtype == (torch.float32 if x.dtype == torch.bfloat16 else x.dtype)
    y = x.float() @ (weight.float() * antiquant_scale.float())
    return (y if bias is None else y + bias.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_npu_kernel_calls_torch_npu_by_its_documented_convention(monkeypatch, dtype):
    stand_in = types.SimpleNamespace(npu_weight_quant_batchmatmul=_documented_weight_quant_batchmatmul)
    monkeypatch.setattr(npu, "_torch_npu", lambda: stand_in)
    q, scale = quantize_per_channel(torch.randn(48, 32))
    x, bias = torch.randn(2, 3, 32).to(dtype), torch.randn(48).to(dtype)
    y = npu.KERNELS["xllm::linear_w8"](x, q, scale, bias)
    assert y.shape == (2, 3, 48) and y.dtype == dtype
    torch.testing.assert_close(y.float(), linear_w8_kernel(x, q, scale, bias).float(), rtol=2e-2, atol=2e-2)


def test_int4_plans_into_the_arena_on_cpu_and_stays_functional_on_npu():
    counts = op_counts(_planned(composite_lowering("cpu"), 16, "int4"))
    assert counts[xllm.linear_w4_out.default] == 4 and counts[xllm.linear_w4.default] == 1
    planned = _planned(NPU_LOWERING, 128, "int4")
    assert NPU_LOWERING.unlowered(planned.graph) == []
    counts = op_counts(planned)
    assert counts[xllm.linear_w4.default] == 5 and counts[xllm.linear_w4_out.default] == 0


_STAND_IN_SHIFTS = torch.arange(8, dtype=torch.int32) * 4


def _documented_int4pack(weight):
    """torch_npu.npu_convert_weight_to_int4pack's documented contract: int32 (K, N) in [-8, 7], N a multiple
    of 8, contiguous -> int32 (K, N/8), eight values an int32 (the stand-in's own nibble order)."""
    assert weight.dtype == torch.int32 and weight.is_contiguous() and weight.shape[-1] % 8 == 0
    assert int(weight.min()) >= -8 and int(weight.max()) <= 7
    nibbles = (weight & 0xF).view(weight.shape[0], -1, 8)
    return (nibbles << _STAND_IN_SHIFTS).sum(dim=-1, dtype=torch.int32)


def _documented_int4_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None, bias=None, **kwargs):
    """npu_weight_quant_batchmatmul's documented per-group int4 contract, in torch."""
    group_size = kwargs["antiquant_group_size"]
    k_size, n_size = x.shape[1], weight.shape[1] * 8
    assert x.dim() == 2 and weight.dtype == torch.int32 and weight.shape[0] == k_size and weight.is_contiguous()
    assert group_size % 32 == 0 and 32 <= group_size <= k_size - 1
    groups = -(-k_size // group_size)
    for companion in (antiquant_scale, antiquant_offset):
        assert companion.shape == (groups, n_size) and companion.dtype == x.dtype
    assert bias is None or bias.dtype == (torch.float32 if x.dtype == torch.bfloat16 else x.dtype)
    signed = ((weight[..., None] >> _STAND_IN_SHIFTS) & 0xF).view(k_size, n_size)
    signed = torch.where(signed > 7, signed - 16, signed).float()
    expand = lambda t: t.float().repeat_interleave(group_size, dim=0)[:k_size]  # noqa: E731 (one use, two tensors)
    y = x.float() @ ((signed + expand(antiquant_offset)) * expand(antiquant_scale))
    return (y if bias is None else y + bias.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("outputs", "k_size", "group_size"), [(48, 100, 32), (64, 256, 128), (16, 130, 64)])
def test_npu_int4_kernel_calls_torch_npu_by_its_documented_convention(monkeypatch, dtype, outputs, k_size, group_size):
    calls = []
    stand_in = types.SimpleNamespace(
        npu_weight_quant_batchmatmul=lambda *a, **k: calls.append(k) or _documented_int4_batchmatmul(*a, **k),
        npu_convert_weight_to_int4pack=_documented_int4pack,
    )
    monkeypatch.setattr(npu, "_torch_npu", lambda: stand_in)
    q, scale, offset = quantize_per_group(torch.randn(outputs, k_size), group_size)
    x, bias = torch.randn(2, 3, k_size).to(dtype), torch.randn(outputs).to(dtype)
    y = npu.KERNELS["xllm::linear_w4"](x, q, scale, offset, group_size, bias)
    assert len(calls) == 1 and calls[0]["antiquant_group_size"] == group_size
    assert y.shape == (2, 3, outputs) and y.dtype == dtype
    expected = linear_w4_kernel(x, q, scale, offset, group_size, bias).float()
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))


@pytest.mark.parametrize(
    ("dtype", "outputs", "k_size", "group_size"),
    [(torch.float32, 48, 100, 32), (torch.bfloat16, 37, 100, 32), (torch.bfloat16, 48, 64, 128)],
    ids=["float32-x", "n-not-a-multiple-of-8", "group-not-below-k"],
)
def test_npu_int4_kernel_keeps_the_composite_where_the_kernel_does_not_fit(
    monkeypatch, dtype, outputs, k_size, group_size
):
    monkeypatch.setattr(npu, "_torch_npu", lambda: pytest.fail("torch_npu called on shapes it does not take"))
    q, scale, offset = quantize_per_group(torch.randn(outputs, k_size), group_size)
    x = torch.randn(3, k_size).to(dtype)
    y = npu.KERNELS["xllm::linear_w4"](x, q, scale, offset, group_size)
    assert torch.equal(y, linear_w4_kernel(x, q, scale, offset, group_size))
