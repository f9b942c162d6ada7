"""What pass tests share: the architectures and depths they cover, and a cache that makes check_pass's
model graphs cheap. Hand-built graphs come from the kit, ``xllm_compiler.testing`` (``trace``, ``cleanup``).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch
from torch import fx

from xllm_compiler import testing

aten, xllm = torch.ops.aten, torch.ops.xllm

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
DEPTHS = (1, 3)


# -- model graphs --------------------------------------------------------------------------------

_BUILT: dict[str, fx.GraphModule] = {}
_build_graph = testing.build_graph


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own graph (nodes and their meta dicts) and module tree, sharing the weight
    tensors and fake values, which passes replace but never modify."""
    copied = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    copied.meta = dict(gm.meta)
    return copied


def cached_build_graph(config: dict[str, Any], dtype: torch.dtype = torch.float32, seed: int = 0) -> fx.GraphModule:
    """testing.build_graph, memoised: torch.export of a model is most of check_pass's time, and a test
    module asks for the same few (architecture, depth, dtype) graphs over and over."""
    key = json.dumps([config, str(dtype), seed], sort_keys=True)
    if key not in _BUILT:
        _BUILT[key] = _build_graph(config, dtype, seed)
    return copy_graph_module(_BUILT[key])


def model_graph(architecture: str, num_layers: int, dtype: torch.dtype = torch.float32) -> fx.GraphModule:
    """A fresh copy of the traced tiny random model check_pass uses."""
    return cached_build_graph(testing.tiny_config(architecture, num_hidden_layers=num_layers), dtype)
