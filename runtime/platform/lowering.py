"""Lowering tables: for each platform, the kernel every ``xllm::`` op (and ``*_out`` form) runs as there.

A table is data the compiler and the runtime both read. The compiler plans memory from it: an op is
rewritten to its ``*_out`` form only where the target platform has a kernel for that form, else it
stays functional and the device's allocator (its graph pool, under graph replay) owns its result. The
manifest records which table (platform, version) the graphs were planned for. The runtime's platform
binds the ops to the kernels the table names. ``Lowering.unlowered`` is the audit: the ops of a graph
that the platform has no kernel for, so a fusion added without an NPU kernel fails a CPU test.

Graphs stay device-agnostic: any platform can run an artifact planned for another (every ``xllm::`` op
keeps its torch composite); it then runs the other platform's plan, not its own.

The NPU signatures below are copied from torch_npu 2.13.0's wheel: csrc/aten/npu_native_functions_by_codegen.yaml
and _op_plugin_docs.py for the ``npu_*`` ops, include/third_party/op-plugin/op_plugin/include/AtbOpsInterface.h for
the ATB ops (``_npu_*``, which need the NNAL/ATB package on top of CANN).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import fx

from xllm_compiler.artifact.allowlist import ATEN_OPS, OPEN_NAMESPACES, PYTHON_OPS
from xllm_compiler.errors import OptionsError
from xllm_compiler.ops import KERNELS, OUT_FORMS

DECODE, PREFILL = "decode", "prefill"


@dataclass(frozen=True)
class Kernel:
    """What one ``xllm::`` op runs as on a platform, for one phase or for all."""

    name: str
    """The callable, e.g. 'torch_npu.npu_rms_norm', or 'composite' (the op's own torch kernel)."""
    signature: str = ""
    """The kernel's documented signature, where it is another library's."""
    phase: str | None = None
    """'decode' or 'prefill' where the op runs a different kernel per phase (prefill also serves the
    dynamic fallback graph); None: every graph."""


@dataclass(frozen=True)
class Lowering:
    """One platform's table. ``version`` changes whenever an entry does (the manifest records it)."""

    platform: str
    version: int
    kernels: Mapping[str, tuple[Kernel, ...]]
    block_size_multiple: int = 1
    """Paged-attention kernels on this platform take KV blocks of a multiple of this many tokens."""
    max_block_size: int | None = None

    def out_forms(self) -> tuple[str, ...]:
        """The ops (ops.OUT_FORMS keys) whose ``*_out`` form has a kernel here: what plan_memory may rewrite."""
        return tuple(sorted(op for op, (out_op, _) in OUT_FORMS.items() if out_op in self.kernels))

    def check_block_size(self, block_size: int) -> None:
        """OptionsError when this platform's attention kernels cannot take KV blocks of ``block_size``."""
        too_big = self.max_block_size is not None and block_size > self.max_block_size
        if block_size % self.block_size_multiple or too_big:
            kernels = ", ".join(k.name for k in self.kernels.get("xllm::paged_attention", ()))
            limit = f" of at most {self.max_block_size}" if self.max_block_size is not None else ""
            raise OptionsError(
                f"device '{self.platform}' needs a block_size that is a multiple of {self.block_size_multiple}"
                f"{limit} ({kernels}), got {block_size}: pass --block-size {self.block_size_multiple}"
            )

    def unlowered(self, graph: fx.Graph) -> list[str]:
        """The ops ``graph`` calls that have no kernel here: an ``xllm::`` op (or out form) off this table,
        or any other op off the artifact allowlist (ATen ops, functional collectives and Python operators
        on it run natively on every platform: through torch_npu on NPU, HCCL for the collectives)."""
        missing = []
        for node in graph.nodes:
            if node.op == "call_function" and not self._runs(node.target):
                missing.append(f"{node.name} ({node.target})")
        return missing

    def _runs(self, target: object) -> bool:
        if not isinstance(target, torch._ops.OpOverload):
            return any(target is op for op in PYTHON_OPS.values())
        namespace, op = target.name().split("::")
        packet = op.split(".")[0]
        if namespace == "xllm":
            return f"xllm::{packet}" in self.kernels
        return namespace in OPEN_NAMESPACES or (namespace == "aten" and packet in ATEN_OPS)


def composite_lowering(platform: str) -> Lowering:
    """Every op as its torch composite (ops.KERNELS; on CPU the fused C++ kernels replace some at load):
    what a platform without kernels of its own runs. Every out form exists."""
    kernels = {op: (Kernel("composite", f"{kernel.__module__}.{kernel.__name__}"),) for op, kernel in KERNELS.items()}
    return Lowering(platform, 1, kernels)


_ADD_RMS_NORM = (
    "torch_npu.npu_add_rms_norm(Tensor x1, Tensor x2, Tensor gamma, float epsilon=1e-06) -> (Tensor y, Tensor rstd, "
    "Tensor x)  [x = x1 + x2]"
)
_RESHAPE_AND_CACHE = (
    "torch_npu._npu_reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
    "Tensor slot_indices) -> ()  [ATB: needs NNAL]"
)
_PAGED_DECODE = Kernel(
    "torch_npu._npu_paged_attention",
    "torch_npu._npu_paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, int num_kv_heads, "
    "int num_heads, float scale_value, Tensor block_table, Tensor context_lens, Tensor(a!) out) -> ()  "
    "[ATB: needs NNAL; one query token per sequence; after _npu_reshape_and_cache]",
    phase=DECODE,
)
_PAGED_PREFILL = Kernel(
    "torch_npu.npu_fused_infer_attention_score",
    "torch_npu.npu_fused_infer_attention_score(Tensor query, Tensor key, Tensor value, *, Tensor? atten_mask, "
    "SymInt[]? actual_seq_lengths, SymInt[]? actual_seq_lengths_kv, Tensor? block_table, int num_heads, "
    "float scale, int pre_tokens, int next_tokens, str input_layout, int num_key_value_heads, int sparse_mode, "
    "int block_size, ...) -> (Tensor, Tensor)  [input_layout='TND', sparse_mode=3 (causal, 2048x2048 mask); "
    "paged KV: block_size a multiple of 128, at most 512; after _npu_reshape_and_cache]",
    phase=PREFILL,
)

_WEIGHT_QUANT_MATMUL = (
    "torch_npu.npu_weight_quant_batchmatmul(Tensor x, Tensor weight, Tensor antiquant_scale, Tensor? "
    "antiquant_offset=None, Tensor? quant_scale=None, Tensor? quant_offset=None, Tensor? bias=None, "
    "int antiquant_group_size=0, int inner_precise=0, int? weight_dtype=None) -> Tensor  [x (M, K) float16 or "
    "bfloat16; weight int8 (K, N): qweight.t(); per-channel antiquant_scale (N,) in x's dtype; bias float32 for "
    "a bfloat16 x; no out= form]"
)
#: Per-group int4 (unrun here: no NPU). From the same docs: an int4 weight is int32 values in [-8, 7] packed
#: eight to an int32 by npu_convert_weight_to_int4pack ((K, N) -> (K, N/8); N a multiple of 8); the kernel
#: dequantizes (weight + antiquant_offset) * antiquant_scale, per group of shape (ceil(K / group), N).
_WEIGHT_QUANT_MATMUL_INT4 = (
    "torch_npu.npu_weight_quant_batchmatmul(Tensor x, Tensor weight, Tensor antiquant_scale, Tensor? "
    "antiquant_offset=None, Tensor? quant_scale=None, Tensor? quant_offset=None, Tensor? bias=None, "
    "int antiquant_group_size=0, int inner_precise=0, int? weight_dtype=None) -> Tensor  [x (M, K) float16 or "
    "bfloat16; weight int32 (K, N/8) = torch_npu.npu_convert_weight_to_int4pack(Tensor weight (K, N) int32 in "
    "[-8, 7], int inner_k_tiles=0); antiquant_scale and antiquant_offset (ceil(K/g), N) in x's dtype; "
    "antiquant_group_size g a multiple of 32 in [32, K-1]; bias float32 for a bfloat16 x; no out= form]"
)
_MOE_COMPOSITE = Kernel("composite", "xllm_compiler.ops.moe.capture_safe_moe_experts_out")
_FUSED_MOE_COMPOSITE = Kernel("composite", "xllm_compiler.ops.moe.capture_safe_fused_moe_out")
_MLA_COMPOSITE = Kernel("composite", "xllm_compiler.ops.mla.capture_safe_mla_attention")
_LATENT_COMPOSITE = Kernel("composite", "xllm_compiler.ops.mla.capture_safe_latent_attention")

#: torch_npu 2.13.0. The four ``*_out`` forms of the elementwise ops have no NPU kernel (none of
#: npu_rms_norm, npu_add_rms_norm, npu_swiglu, npu_rotary_mul has an out= overload), nor have linear_w8's
#: and linear_w4's (npu_weight_quant_batchmatmul): on NPU they stay functional. Attention's out form does:
#: _npu_paged_attention writes into ``out``.
NPU_LOWERING = Lowering(
    platform="npu",
    version=5,
    kernels={
        "xllm::rms_norm": (
            Kernel(
                "torch_npu.npu_rms_norm",
                "torch_npu.npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor y, Tensor rstd)",
            ),
        ),
        "xllm::fused_add_rms_norm": (Kernel("torch_npu.npu_add_rms_norm", _ADD_RMS_NORM),),
        "xllm::silu_and_mul": (
            Kernel(
                "torch_npu.npu_swiglu",
                "torch_npu.npu_swiglu(Tensor self, int dim=-1) -> Tensor  [swish(A) * B, A and B the halves on dim]",
            ),
        ),
        "xllm::rotary_embedding": (
            Kernel(
                "torch_npu.npu_rotary_mul",
                "torch_npu.npu_rotary_mul(Tensor input, Tensor r1, Tensor r2, str rotary_mode='half', "
                "Tensor? rotate=None) -> Tensor  [4-d BSND: q/k as [1, T, N, D], cos/sin as [1, T, 1, D]]",
            ),
        ),
        "xllm::write_kv_cache": (Kernel("torch_npu._npu_reshape_and_cache", _RESHAPE_AND_CACHE),),
        "xllm::paged_attention": (_PAGED_DECODE, _PAGED_PREFILL),
        "xllm::paged_attention_out": (_PAGED_DECODE, _PAGED_PREFILL),
        "xllm::all_reduce_add_rms_norm": (
            Kernel("_c10d_functional.all_reduce (HCCL) + wait_tensor + torch_npu.npu_add_rms_norm", _ADD_RMS_NORM),
        ),
        # No grouped-matmul kernel yet (torch_npu.npu_grouped_matmul is the candidate): the capture-safe composite.
        "xllm::moe_experts": (_MOE_COMPOSITE,),
        "xllm::moe_experts_out": (_MOE_COMPOSITE,),
        "xllm::fused_moe": (_FUSED_MOE_COMPOSITE,),
        "xllm::fused_moe_out": (_FUSED_MOE_COMPOSITE,),
        "xllm::linear_w8": (Kernel("torch_npu.npu_weight_quant_batchmatmul", _WEIGHT_QUANT_MATMUL),),
        "xllm::linear_w4": (Kernel("torch_npu.npu_weight_quant_batchmatmul", _WEIGHT_QUANT_MATMUL_INT4),),
        # MLA: the capture-safe composites (npu_fused_infer_attention_score's query_rope/key_rope inputs over a
        # latent cache are the candidate kernel; not wired without a device to check them on).
        "xllm::mla_attention": (_MLA_COMPOSITE,),
        "xllm::latent_attention": (_LATENT_COMPOSITE,),
    },
    block_size_multiple=128,
    max_block_size=512,
)
