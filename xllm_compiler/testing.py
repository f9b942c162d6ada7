"""Test helpers for pass developers: check a pass on a real model graph in a few lines.

    from xllm_compiler.testing import check_pass
    result = check_pass(fuse_rms_norm, "Qwen3ForCausalLM", num_layers=2, expected_matches=1 + 2 * 2)

``check_pass`` builds a random-weight model of the architecture (a tiny config, or your own),
traces it, runs every pipeline pass that comes before yours (so the graph is in the form your pass
will really see), then your pass, and asserts: the match count, the op counts you name (before and
after), a valid graph, and numerics: two real steps (prefill, then decode through the KV cache)
before and after agree within the dtype's tolerance, in float32 and bfloat16.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from xllm_compiler.capture import capture
from xllm_compiler.interface import STEP_INPUTS, kv_cache_input
from xllm_compiler.models import spec_from_config
from xllm_compiler.models.decoder import DecoderForCausalLM
from xllm_compiler.passes import GraphPass, default_pipeline
from xllm_compiler.passes.verify import TOLERANCE, relative_error, run_steps, sample_steps

TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)
BLOCK_SIZE = 4


def tiny_config(architecture: str, **overrides: Any) -> dict[str, Any]:
    """A config.json dict for a tiny model of ``architecture``."""
    return {"architectures": [architecture], **TINY_CONFIG, **overrides}


def build_graph(config: dict[str, Any], dtype: torch.dtype = torch.float32, seed: int = 0) -> fx.GraphModule:
    """The traced graph of a random-weight model (norm weights and biases random too)."""
    spec = spec_from_config(config)
    torch.manual_seed(seed)
    model = DecoderForCausalLM(spec, spec.max_position_embeddings, torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param) if "norm" in name else 0.1 * torch.randn_like(param))
    model = model.to(dtype).eval()
    kv = [kv_cache_input(i, dtype, BLOCK_SIZE, spec.num_kv_heads, spec.head_dim) for i in range(spec.num_layers)]
    return capture(model, STEP_INPUTS, kv)


def op_counts(gm: fx.GraphModule) -> Counter:
    """How many call_function nodes call each target."""
    return Counter(node.target for node in gm.graph.nodes if node.op == "call_function")


def passes_before(graph_pass: GraphPass) -> list[GraphPass]:
    """The pipeline passes that run before ``graph_pass`` (its cleanup only, if it is not in the pipeline)."""
    pipeline = default_pipeline()
    names = [p.name for p in pipeline]
    if graph_pass.name in names:
        return pipeline[: names.index(graph_pass.name)]
    return [
        p for p in pipeline if p.name in ("remove_noop_ops", "eliminate_common_subexpressions", "eliminate_dead_code")
    ]


@dataclass
class PassCheck:
    """What check_pass saw, for further assertions."""

    dtype: torch.dtype
    matches: int
    before: Counter
    after: Counter
    error: float
    graph: fx.GraphModule


def check_pass(
    graph_pass: GraphPass,
    architecture_or_config: str | dict[str, Any],
    expected_matches: int,
    num_layers: int = 2,
    ops_before: dict[Any, int] | None = None,
    ops_after: dict[Any, int] | None = None,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
    prepare: list[GraphPass] | None = None,
) -> list[PassCheck]:
    """Run ``graph_pass`` on a real model graph and assert matches, op counts and numerics, per dtype.

    ``prepare`` replaces the passes run first (default: the pipeline's passes before this one).
    """
    config = architecture_or_config
    if isinstance(config, str):
        config = tiny_config(config, num_hidden_layers=num_layers)
    checks = []
    for dtype in dtypes:
        gm = build_graph(config, dtype)
        for earlier in passes_before(graph_pass) if prepare is None else prepare:
            earlier(gm)
        gm.recompile()
        steps, caches = sample_steps(gm)
        reference = run_steps(gm, steps, caches)
        before = op_counts(gm)
        result = graph_pass(gm)
        gm.graph.lint()
        gm.recompile()
        after = op_counts(gm)
        error = relative_error(run_steps(gm, steps, caches), reference)
        assert result.matches == expected_matches, (
            f"{graph_pass.name} [{dtype}]: {result.matches} matches, expected {expected_matches}"
        )
        assert bool(result) == (expected_matches > 0), f"{graph_pass.name}: changed={bool(result)}"
        for target, count in (ops_before or {}).items():
            assert before[target] == count, (
                f"{graph_pass.name} [{dtype}]: {before[target]} x {target} before, expected {count}"
            )
        for target, count in (ops_after or {}).items():
            assert after[target] == count, (
                f"{graph_pass.name} [{dtype}]: {after[target]} x {target} after, expected {count}"
            )
        assert error <= TOLERANCE[dtype], (
            f"{graph_pass.name} [{dtype}]: relative error {error:.3g} > {TOLERANCE[dtype]}"
        )
        checks.append(PassCheck(dtype, result.matches, before, after, error, gm))
    return checks
