"""Where xllm::linear_w8 runs: memory planning per platform, and the NPU kernel's calling convention.

On CPU the op has an out form (the planner makes it write into the arena); on NPU its kernel,
npu_weight_quant_batchmatmul, has none, so it stays functional there and the NPU audit finds every op of
a quantized graph in the table. The NPU kernel is checked against a stand-in that implements torch_npu's
documented contract (x (M, K), weight (K, N) int8, per-channel scale (N,) in x's dtype, float32 bias
for bfloat16 x), which pins the argument conventions; it cannot check the device.
"""

from __future__ import annotations

import types

import pytest
import torch

from tests.passes.graphs import model_graph
from xllm_compiler.buckets import DECODE, Bucket
from xllm_compiler.buckets.specialize import specialize
from xllm_compiler.compiler import bucket_passes_for
from xllm_compiler.ops.quant import linear_w8_kernel, quantize_per_channel
from xllm_compiler.options import make_options
from xllm_compiler.passes import PassManager, default_pipeline
from xllm_compiler.passes.quant.quantize_linear_weights import QuantizeOptions
from xllm_compiler.runtime.platform import npu
from xllm_compiler.runtime.platform.lowering import NPU_LOWERING, composite_lowering
from xllm_compiler.testing import op_counts

xllm = torch.ops.xllm


def _planned(lowering, block_size: int) -> torch.fx.GraphModule:
    gm = model_graph("Qwen2ForCausalLM", 1)  # QKV bias: linear_w8 with a bias too
    PassManager(default_pipeline(QuantizeOptions("int8"))).run(gm)
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
