"""Ascend NPU through torch_npu (the ``npu`` extra: ``pip install 'xllm-compiler[npu]'``, on a machine with
the CANN toolkit, and the NNAL/ATB package for the paged-attention kernels).

torch_npu is imported only when this platform is asked for, and a failed import is named precisely:
without CANN, ``import torch_npu`` raises an ImportError on libhccl.so (torch's backend autoload would
turn that into a RuntimeError inside ``import torch``; xllm_compiler/__init__.py opts out of the
autoload, so CPU use never depends on the NPU stack). Every outcome of the import is cached: importing
a half-loaded torch_npu a second time fails differently.

Lowering follows lowering.py's ``NPU_LOWERING``, one entry per ``xllm::`` op. ``register_kernels``
binds the ops that run one kernel in every graph to it for the "npu" dispatch key. ``lower`` rewrites
attention per graph: decode buckets run ``_npu_paged_attention`` (one query token per sequence),
prefill buckets and the dynamic fallback ``npu_fused_infer_attention_score`` over the paged cache
(TND layout, causal), both after ``_npu_reshape_and_cache``. A step with a sliding window (neither
kernel's documented decode path takes one) or a micro-batch half (``token_offset``: the kernels attend
whole steps) keeps the torch composite.

Untested here: this project's machines have no NPU and no CANN. What is tested on CPU is the import
diagnosis (tests/runtime/test_npu_platform.py), the table's coverage of every op a graph can hold, and
the memory plan and manifest an NPU compile produces (tests/test_npu_lowering_audit.py). Every kernel
call below follows torch_npu 2.13.0's documented signatures (lowering.py cites them) and nothing
more: no result on an NPU is claimed anywhere in this repository.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import re
from collections.abc import Callable
from types import ModuleType

import torch
from torch import fx

from xllm_compiler.buckets.policy import ONE_ROW_PER_SEQUENCE
from xllm_compiler.errors import DeviceError
from xllm_compiler.ops import attention, mla, moe, quant
from xllm_compiler.runtime.platform.base import Platform
from xllm_compiler.runtime.platform.lowering import DECODE, NPU_LOWERING, PREFILL, Lowering
from xllm_compiler.runtime.replay import GraphRunner, RunnerFactory, TorchairRunner

CANN_ENV = "/usr/local/Ascend/ascend-toolkit/set_env.sh"
_MISSING_LIBRARY = re.compile(r"(lib[\w.+-]+\.so[\w.]*): cannot open shared object file")
#: npu_fused_infer_attention_score's sparse_mode 3 (causal, bottom-right aligned) takes this mask size.
_CAUSAL_MASK_SIZE = 2048


@functools.cache
def import_torch_npu() -> tuple[ModuleType | None, str | None]:
    """(torch_npu, None) when it loads, else (None, why not: one line naming what is missing)."""
    try:
        return importlib.import_module("torch_npu"), None
    except (ImportError, OSError, RuntimeError) as exc:
        return None, import_problem(exc)


def import_problem(exc: BaseException) -> str:
    """What a failed ``import torch_npu`` says about the machine."""
    if isinstance(exc, ModuleNotFoundError) and exc.name == "torch_npu":
        return "device 'npu' needs torch_npu, which is not installed (pip install 'xllm-compiler[npu]')"
    try:
        version: str | None = importlib.metadata.version("torch_npu")
    except importlib.metadata.PackageNotFoundError:
        version = None
    installed = f"device 'npu': torch_npu {version or '(version unknown)'} is installed but"
    library = _missing_library(exc)
    if library is not None:
        return (
            f"{installed} cannot load {library}: the CANN toolkit is not installed or not sourced (source {CANN_ENV})"
        )
    if version is not None and version.split(".")[:2] != torch.__version__.split(".")[:2]:
        return (
            f"{installed} is built for another torch than this {torch.__version__} (pip install 'xllm-compiler[npu]')"
        )
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{installed} failed to import ({type(exc).__name__}: {detail})"


def _missing_library(exc: BaseException | None) -> str | None:
    """The shared library ``exc`` (or an exception it was raised from) could not open."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        match = _MISSING_LIBRARY.search(str(exc))
        if match:
            return match.group(1)
        exc = exc.__cause__ or exc.__context__
    return None


def _torch_npu() -> ModuleType:
    npu, problem = import_torch_npu()
    if npu is None:
        raise DeviceError(problem)
    return npu


class NpuPlatform(Platform):
    name = "npu"

    def is_available(self) -> bool:
        npu, _ = import_torch_npu()
        if npu is None:
            return False
        try:
            return bool(npu.npu.is_available())
        except RuntimeError:  # a driver that torch_npu loaded but cannot talk to
            return False

    def unavailable_reason(self) -> str:
        _, problem = import_torch_npu()
        if problem is not None:
            return problem
        return (
            "device 'npu' is not available (torch_npu loaded but finds no Ascend device: check the driver, "
            "npu-smi info, and ASCEND_RT_VISIBLE_DEVICES)"
        )

    def synchronize(self) -> None:
        _torch_npu().npu.synchronize()

    def free_memory_bytes(self) -> int:
        return int(_torch_npu().npu.mem_get_info()[0])

    def total_memory_bytes(self) -> int:
        return int(_torch_npu().npu.mem_get_info()[1])

    def lowering(self) -> Lowering:
        return NPU_LOWERING

    def register_kernels(self) -> None:
        """Bind every op the table gives one kernel for all graphs (idempotent)."""
        _register_kernels()

    def graph_runner(self) -> RunnerFactory:
        """Bucket graphs compiled by torchair (aclgraph capture, replayed: runtime/replay.py), except those
        whose attention is prefill's npu_fused_infer_attention_score, which takes the lengths as host int
        lists and so cannot be captured: those run eagerly. Untested here (no NPU)."""

        def runner(module: fx.GraphModule) -> GraphRunner:
            reads_host = any(node.target is _prefill for node in module.graph.nodes)
            return module if reads_host else TorchairRunner(module)

        return runner

    def lower(self, graphs: dict[str, fx.Graph], weights: dict[str, torch.Tensor]) -> None:
        """Attention by phase: decode and verify buckets (named 'decode_<n>', 'verify_<n>': one query row per
        sequence entry) run the decode kernel, the rest prefill's."""
        for name, graph in graphs.items():
            kernels = PHASE_KERNELS[DECODE if name.split("_")[0] in ONE_ROW_PER_SEQUENCE else PREFILL]
            for node in graph.nodes:
                if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                    node.target = kernels.get(node.target.name(), node.target)


@functools.cache
def _register_kernels() -> None:
    for op, kernels in NPU_LOWERING.kernels.items():
        if all(k.phase is None for k in kernels):
            torch.library.register_kernel(op, "npu", KERNELS[op])


# -- the kernels: NPU_LOWERING's entries, in torch_npu's calling conventions ---------------------------


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _torch_npu().npu_rms_norm(x, weight, epsilon=eps)[0]


def _fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    y, _rstd, summed = _torch_npu().npu_add_rms_norm(x, residual, weight, eps)
    return y, summed


def _silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return _torch_npu().npu_swiglu(gate_up, dim=-1)


def _rotary_embedding(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    npu = _torch_npu()
    cos4, sin4 = cos.unsqueeze(0), sin.unsqueeze(0)  # [T, 1, D] -> [1, T, 1, D]: BSND with B = 1
    q = npu.npu_rotary_mul(query.unsqueeze(0), cos4, sin4).squeeze(0)
    k = npu.npu_rotary_mul(key.unsqueeze(0), cos4, sin4).squeeze(0)
    return q, k


def _write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    _torch_npu()._npu_reshape_and_cache(
        key=key, value=value, key_cache=kv_cache[0], value_cache=kv_cache[1], slot_indices=slot_mapping.int()
    )


def _all_reduce_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    funcol = torch.ops._c10d_functional
    reduced = funcol.wait_tensor.default(funcol.all_reduce.default(x, "sum", group_name))
    return _fused_add_rms_norm(reduced, residual, weight, eps)


def _decode(query, kv_cache, seq_lens, block_tables, scale, out, **_) -> None:
    """Row i of a decode bucket is sequence i's one new token; ``seq_lens`` counts its context with it.
    Padding sequences (length 0) get zero rows, as the composite gives them. Unchecked: ATB reads
    ``context_lens`` on the host (vllm-ascend passes a CPU tensor; under aclgraph capture torch_npu
    re-feeds it at each replay, torch_npu/npu/_npugraph_handlers/simple_handler.py); here it is the graph
    input, wherever the runtime put it."""
    _torch_npu()._npu_paged_attention(
        query=query,
        key_cache=kv_cache[0],
        value_cache=kv_cache[1],
        num_kv_heads=kv_cache.shape[-2],
        num_heads=query.shape[1],
        scale_value=scale,
        block_table=block_tables,
        context_lens=seq_lens,
        out=out,
    )
    out.masked_fill_((seq_lens == 0)[:, None, None], 0)


@functools.cache
def _causal_mask(device: torch.device) -> torch.Tensor:
    """sparse_mode 3's mask: true above the diagonal (masked), the size the kernel's docs require."""
    ones = torch.ones(_CAUSAL_MASK_SIZE, _CAUSAL_MASK_SIZE, dtype=torch.bool, device=device)
    return torch.triu(ones, diagonal=1)


def _prefill(query, kv_cache, query_lens, seq_lens, block_tables, scale, out, **_) -> None:
    """The step's prompts packed back to back (TND), each over its paged context; padding rows zeroed.
    The kernel takes the lengths as int lists: they are read on the host here."""
    num_blocks, block_size, num_kv_heads = kv_cache.shape[1:4]
    ends = query_lens.cumsum(0).tolist()
    total = ends[-1] if ends else 0
    attended, _lse = _torch_npu().npu_fused_infer_attention_score(
        query[:total],
        kv_cache[0].view(num_blocks, block_size, -1),
        kv_cache[1].view(num_blocks, block_size, -1),
        atten_mask=_causal_mask(query.device),
        actual_seq_lengths=ends,
        actual_seq_lengths_kv=seq_lens.tolist(),
        block_table=block_tables,
        num_heads=query.shape[1],
        scale=scale,
        input_layout="TND",
        num_key_value_heads=num_kv_heads,
        sparse_mode=3,
        block_size=block_size,
    )
    out[:total] = attended
    out[total:].zero_()


#: xllm::paged_attention's arguments, in its schema's order.
_ATTENTION_ARGS = (
    "query", "key", "value", "kv_cache", "slot_mapping", "query_lens", "seq_lens", "block_tables", "scale",
    "sliding_window", "token_offset",
)  # fmt: skip


def _attention_kernels(fused: Callable[..., None]) -> dict[str, Callable]:
    """xllm::paged_attention and its out form over ``fused``, after the cache write; a sliding window or a
    micro-batch half (token_offset) keeps the composite."""

    def paged_attention_out(**args) -> None:
        if args["sliding_window"] > 0 or args.get("token_offset", 0):
            attention.paged_attention_out_kernel(**args)
            return
        _write_kv_cache(args["key"], args["value"], args["kv_cache"], args["slot_mapping"])
        fused(**args)

    def paged_attention(*args, **kwargs) -> torch.Tensor:
        bound = {**dict(zip(_ATTENTION_ARGS, args, strict=False)), **kwargs}
        out = torch.empty_like(bound["query"])
        paged_attention_out(out=out, **bound)
        return out

    return {"xllm::paged_attention": paged_attention, "xllm::paged_attention_out": paged_attention_out}


def _linear_w8(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """xllm::linear_w8 in npu_weight_quant_batchmatmul's convention: rows as a 2-d x, the weight as its (K, N)
    transpose (a view; the layout its docs recommend per channel), the scales in x's dtype, a bfloat16 x's
    bias in float32. The kernel takes float16 and bfloat16 x only: a float32 model keeps the composite."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return quant.linear_w8_kernel(x, qweight, scale, bias)
    if bias is not None and x.dtype == torch.bfloat16:
        bias = bias.float()
    rows = x.reshape(-1, x.shape[-1])
    y = _torch_npu().npu_weight_quant_batchmatmul(rows, qweight.t(), scale.to(x.dtype), bias=bias)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


#: npu_weight_quant_batchmatmul's per-group limits: K and N at most this, the group a multiple of 32 below K.
_WEIGHT_QUANT_MAX_DIM = 65535
#: npu_convert_weight_to_int4pack packs eight int4 values of a row into one int32.
_INT4_PER_INT32 = 8
#: torch_npu's int4 is signed ([-8, 7]); ours is unsigned ([0, 15]): q = signed + 8.
_INT4_ZERO = 8


def _linear_w4(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """xllm::linear_w4 as npu_weight_quant_batchmatmul's per-group int4 case. Written to torch_npu 2.13.0's
    docs and never run (no NPU here; tests/quant/test_lowering.py checks it against a stand-in of the
    documented contract, which pins shapes, dtypes and the offset convention, not the device's packing).

    torch_npu takes int4 as signed values ``s`` in [-8, 7] and dequantizes ``(s + offset_npu) * scale``; ours
    are ``q * scale + offset`` with q in [0, 15], so ``s = q - 8`` and ``offset_npu = offset / scale + 8``,
    both (G, N) in x's dtype (a group that spans zero has |offset_npu| <= 8, which bfloat16 rounds by at most
    1/64 of a step; a group far from zero loses more). Per-group int4 is documented for Atlas A2 and A3 only.
    The weight is unpacked to int32 (K, N) and packed by npu_convert_weight_to_int4pack on every call: a
    load-time repack (``Platform.lower`` owns the weights) is the next step once a device can measure it.
    x not float16 or bfloat16, N not a multiple of 8, a group not below K, or K or N over 65535: the
    composite."""
    k_size, n_size = x.shape[-1], qweight.shape[0]
    fits = n_size % _INT4_PER_INT32 == 0 and group_size < k_size and max(k_size, n_size) <= _WEIGHT_QUANT_MAX_DIM
    if x.dtype not in (torch.float16, torch.bfloat16) or not fits:
        return quant.linear_w4_kernel(x, qweight, scale, offset, group_size, bias)
    npu = _torch_npu()
    signed = quant.unpack_int4(qweight, k_size).to(torch.int32) - _INT4_ZERO
    weight = npu.npu_convert_weight_to_int4pack(signed.t().contiguous())
    antiquant_scale = scale.t().contiguous().to(x.dtype)
    antiquant_offset = (offset / scale + _INT4_ZERO).t().contiguous().to(x.dtype)
    if bias is not None and x.dtype == torch.bfloat16:
        bias = bias.float()
    rows = x.reshape(-1, k_size)
    y = npu.npu_weight_quant_batchmatmul(
        rows, weight, antiquant_scale, antiquant_offset, bias=bias, antiquant_group_size=group_size
    )
    return y.reshape(*x.shape[:-1], n_size)


#: The kernel of each op that runs one kernel in every graph (registered for the "npu" key).
KERNELS: dict[str, Callable] = {
    "xllm::rms_norm": _rms_norm,
    "xllm::fused_add_rms_norm": _fused_add_rms_norm,
    "xllm::silu_and_mul": _silu_and_mul,
    "xllm::rotary_embedding": _rotary_embedding,
    "xllm::write_kv_cache": _write_kv_cache,
    "xllm::all_reduce_add_rms_norm": _all_reduce_add_rms_norm,
    **moe.CAPTURE_SAFE_KERNELS,  # the table's composites: no NPU kernel yet
    **mla.CAPTURE_SAFE_KERNELS,
    "xllm::linear_w8": _linear_w8,
    "xllm::linear_w4": _linear_w4,
}
#: Attention's kernels by phase (``lower`` puts them in the graphs).
PHASE_KERNELS: dict[str, dict[str, Callable]] = {
    DECODE: _attention_kernels(_decode),
    PREFILL: _attention_kernels(_prefill),
}

__all__ = ["CANN_ENV", "KERNELS", "PHASE_KERNELS", "NpuPlatform", "import_problem", "import_torch_npu"]
