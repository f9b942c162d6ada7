"""Checkpoint -> flat traceable decoder (gpt-fast style). Knows checkpoints and torch, nothing else."""

from xllm_compiler.models.build import build_model
from xllm_compiler.models.config import ModelSpec
from xllm_compiler.models.parallel import TensorParallel
from xllm_compiler.models.registry import ARCHITECTURES, load_spec, spec_from_config

__all__ = ["ARCHITECTURES", "ModelSpec", "TensorParallel", "build_model", "load_spec", "spec_from_config"]
