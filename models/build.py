"""Build a loaded, traceable decoder from a checkpoint folder: config.json + safetensors -> module."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from xllm_compiler.models.config import ModelSpec
from xllm_compiler.models.decoder import WEIGHTS_READ_DIRECTLY, DecoderForCausalLM, RowParallelLinear
from xllm_compiler.models.int4_linear import Int4Linear
from xllm_compiler.models.parallel import TensorParallel
from xllm_compiler.models.quantization import quantization_of
from xllm_compiler.models.registry import load_spec
from xllm_compiler.models.weights import Checkpoint, load_experts

EXPERT_TENSORS = ("experts.gate_up_proj", "experts.down_proj")
#: DeepSeek-V3's router tensors, which stay float32 whatever the model dtype (as in transformers).
FLOAT32_ROUTER_TENSORS = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")
#: The projections whose outputs hold MLA's rotary parts (per head for the query, once for the latent key).
MLA_ROPE_PROJECTIONS = ("self_attn.q_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa")


def deinterleave_rope_rows(spec: ModelSpec, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the output rows of its rotary parts reordered from DeepSeek's interleaved pairs
    (x0, x1), (x2, x3)... to the halves (x0, x2, ...), (x1, x3, ...) that rotate_half rotates.

    transformers' interleaved rotary gives exactly the de-interleaved values rotated the rotate-half way,
    and queries and keys are reordered alike (attention only sees their dot products), so doing it once
    in the weights leaves one rotary form in every graph, and results bit-identical.
    """
    mla = spec.mla
    module = name.rpartition(".")[0]
    if mla is None or not mla.rope_interleave or not module.endswith(MLA_ROPE_PROJECTIONS):
        return tensor
    rope = mla.qk_rope_head_dim
    head = mla.latent_dim if module.endswith("kv_a_proj_with_mqa") else mla.qk_head_dim
    order = torch.arange(head)
    order[-rope:] = torch.cat((order[-rope::2], order[-rope + 1 :: 2]))
    rows = tensor.view(-1, head, *tensor.shape[1:]).index_select(1, order)
    return rows.reshape(tensor.shape)


def keep_int4_linears(model: nn.Module, checkpoint: Checkpoint, spec: ModelSpec, tp: TensorParallel) -> None:
    """Replace each linear layer whose weight the checkpoint stores as GPTQ / AWQ integers that
    linear_w4 holds exactly (``Checkpoint.load_int4``) by an Int4Linear on them (this rank's shard). The
    others keep their float weights, loaded dequantized."""
    orders: list[torch.Tensor] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, RowParallelLinear)) or name.endswith(WEIGHTS_READ_DIRECTLY):
            continue
        if name == "lm_head" and spec.tie_word_embeddings:
            continue  # the embedding table reads the same float weight
        weight_name = f"{name}.weight"
        weight = checkpoint.load_int4(weight_name, *_whole_and_shard(tp, weight_name, module.weight.shape))
        if weight is None:
            continue
        weight = weight.map_rows(lambda rows, n=weight_name: deinterleave_rope_rows(spec, n, rows))
        if weight.input_order is not None:
            weight = dataclasses.replace(weight, input_order=_shared(weight.input_order, orders))
        reduce = isinstance(module, RowParallelLinear) and module.tp.size > 1 and module.reduce
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, Int4Linear(weight, module.weight.shape[1], module.bias, reduce))


def _whole_and_shard(
    tp: TensorParallel, name: str, local_shape: torch.Size
) -> tuple[tuple[int, ...], tuple[int, int, int] | None]:
    """(the whole shape of tensor ``name``, of which this rank holds ``local_shape``; this rank's shard
    (dim, start, end), or None where every rank holds all of it), as Checkpoint.load takes them."""
    dim, whole = tp.shard_dim(name), list(local_shape)
    if dim is None:
        return tuple(whole), None
    whole[dim] *= tp.size
    return tuple(whole), (dim, *tp.span(whole[dim]))


def _shared(order: torch.Tensor, seen: list[torch.Tensor]) -> torch.Tensor:
    """``order``, or an equal one already in ``seen``: layers reading one input in one act-order (GPTQ
    derives it from the input's statistics, so Q, K and V share theirs) then gather it with one tensor,
    one gather after common-subexpression elimination, and their projections merge."""
    for other in seen:
        if torch.equal(other, order):
            return other
    seen.append(order)
    return order


def build_model(
    model_dir: Path,
    dtype: torch.dtype,
    max_positions: int,
    spec: ModelSpec | None = None,
    tp: TensorParallel | None = None,
) -> DecoderForCausalLM:
    """The decoder for ``model_dir`` with its weights (mmap-read, cast to ``dtype``), ready to trace;
    with ``tp``, this rank's shards only (each read as a slice of its file).

    Parameters are created on the meta device and replaced one by one, so a checkpoint is never held
    twice in memory.
    """
    spec = spec or load_spec(model_dir)
    tp = tp or TensorParallel()
    with torch.device("meta"):
        model = DecoderForCausalLM(spec, max_positions, dtype, tp)
    with Checkpoint(model_dir, quantization_of(model_dir)) as checkpoint:
        keep_int4_linears(model, checkpoint, spec, tp)
        for name, param in list(model.named_parameters()):
            router = spec.moe is not None and spec.moe.router_in_float32 and name.endswith(FLOAT32_ROUTER_TENSORS)
            load_dtype = torch.float32 if router else dtype
            if spec.moe is not None and name.endswith(EXPERT_TENSORS):
                span = tp.span(spec.moe.expert_intermediate_size)
                slots = model.get_submodule(name.rpartition(".")[0]).rows
                tensor = load_experts(checkpoint, name, spec.moe, tuple(param.shape), dtype, span, slots)
            else:  # a router's float32 tensors are never split
                whole, shard = _whole_and_shard(tp, name, param.shape)
                tensor = checkpoint.load(name, whole, load_dtype, shard)
            tensor = deinterleave_rope_rows(spec, name, tensor)
            owner_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner_name), leaf, torch.nn.Parameter(tensor, requires_grad=False))
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
