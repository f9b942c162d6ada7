"""Build a loaded, traceable decoder from a checkpoint folder: config.json + safetensors -> module."""

from __future__ import annotations

from pathlib import Path

import torch

from xllm_compiler.models.config import ModelSpec
from xllm_compiler.models.decoder import DecoderForCausalLM
from xllm_compiler.models.parallel import TensorParallel
from xllm_compiler.models.registry import load_spec
from xllm_compiler.models.weights import Checkpoint, load_experts

EXPERT_TENSORS = ("experts.gate_up_proj", "experts.down_proj")


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
    with Checkpoint(model_dir) as checkpoint:
        for name, param in list(model.named_parameters()):
            dim = tp.shard_dim(name)
            if spec.moe is not None and name.endswith(EXPERT_TENSORS):
                span = tp.span(spec.moe.expert_intermediate_size)
                tensor = load_experts(checkpoint, name, spec.moe, tuple(param.shape), dtype, span)
            elif dim is None:
                tensor = checkpoint.load(name, tuple(param.shape), dtype)
            else:
                whole = list(param.shape)
                whole[dim] *= tp.size
                tensor = checkpoint.load(name, tuple(whole), dtype, (dim, *tp.span(whole[dim])))
            owner_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner_name), leaf, torch.nn.Parameter(tensor, requires_grad=False))
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
