"""The pass-writer's kit: check a pass on a real model graph, or on a small graph you write by hand.

On a model graph, in a few lines::

    from xllm_compiler.testing import check_pass
    result = check_pass(fuse_rms_norm, "Qwen3ForCausalLM", num_layers=2, expected_matches=1 + 2 * 2)

``check_pass`` builds a random-weight model of the architecture (a tiny config, or your own),
traces it, runs every pipeline pass that comes before yours (so the graph is in the form your pass
will really see), then your pass, and asserts: the match count, the op counts you name (before and
after), a valid graph, and numerics: two real steps (prefill, then decode through the KV cache)
before and after agree within the dtype's tolerance, in float32 and bfloat16.

A pass of the bucket pipeline (it runs on one bucket's specialised graph) is checked on the bucket you
name: ``check_pass(absorb_mla_weights, config, 2, bucket=Bucket("decode", 2, 2))`` runs the prefill step
on the whole graph, then the decode step on the bucket's graph before and after the pass.

On a hand-built graph (a pattern no bundled model contains, a corner case a model never shows)::

    x = torch.randn(5, 8)
    gm = cleanup(trace(lambda x: x * torch.sigmoid(x), x))
    expected = run(gm, x)
    assert my_pass(gm).matches == 1
    assert_close(run(gm, x), expected, torch.float32)

``trace`` gives the ATen graph torch.export would (symbolic sizes, ``meta["val"]`` on every node,
weights as ``get_attr``); ``cleanup`` then runs the canonicalising passes the pipeline runs before
any fusion, without which a hand-built graph holds no-op casts and views the real one never shows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from xllm_compiler.buckets.policy import Bucket
from xllm_compiler.buckets.specialize import specialize
from xllm_compiler.capture import capture
from xllm_compiler.interface import STEP_INPUTS, kv_cache_input
from xllm_compiler.models import spec_from_config
from xllm_compiler.models.config import kv_cache_geometry
from xllm_compiler.models.decoder import DecoderForCausalLM
from xllm_compiler.passes import GraphPass, bucket_pipeline, default_pipeline
from xllm_compiler.passes.pattern_pass import CANONICAL_CLEANUP
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
    planes, heads, width = kv_cache_geometry(spec)
    kv = [kv_cache_input(i, dtype, BLOCK_SIZE, heads, width, planes) for i in range(spec.num_layers)]
    return capture(model, STEP_INPUTS, kv)


def op_counts(gm: fx.GraphModule) -> Counter:
    """How many call_function nodes call each target."""
    return Counter(node.target for node in gm.graph.nodes if node.op == "call_function")


def passes_before(graph_pass: GraphPass) -> list[GraphPass]:
    """The pipeline passes that run before ``graph_pass``: for a bucket pass, the whole graph pipeline and
    the bucket passes before it; its cleanup only, if it is in neither pipeline."""
    pipeline = default_pipeline()
    if graph_pass.name in [p.name for p in bucket_pipeline()]:
        pipeline += bucket_pipeline()
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
    bucket: Bucket | None = None,
) -> list[PassCheck]:
    """Run ``graph_pass`` on a real model graph and assert matches, op counts and numerics, per dtype.

    ``prepare`` replaces the passes run first (default: the pipeline's passes before this one). ``bucket``:
    check a bucket pass on that bucket's graph (a decode bucket of as many sequences as the sample steps'),
    the caches filled by the prefill step on the whole graph.
    """
    config = architecture_or_config
    if isinstance(config, str):
        config = tiny_config(config, num_hidden_layers=num_layers)
    checks = []
    for dtype in dtypes:
        gm = build_graph(config, dtype)
        bucket_passes = {p.name for p in bucket_pipeline()}
        for earlier in passes_before(graph_pass) if prepare is None else prepare:
            if earlier.name not in bucket_passes or bucket is None:
                earlier(gm)
        gm.recompile()
        steps, caches = sample_steps(gm)
        if bucket is not None:
            caches = _prefilled(gm, steps[0], caches)
            gm, steps = specialize(gm, bucket), steps[1:]
            for earlier in passes_before(graph_pass) if prepare is None else prepare:
                if earlier.name in bucket_passes:
                    earlier(gm)
            gm.recompile()
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


def _prefilled(gm: fx.GraphModule, step: dict[str, torch.Tensor], caches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``caches`` after running ``step`` on ``gm``."""
    caches = [c.clone() for c in caches]
    with torch.inference_mode():
        gm(*(step[s.name] for s in STEP_INPUTS), *caches)
    return caches


# -- hand-built graphs ---------------------------------------------------------------------------


def trace(
    fn: Callable[..., Any],
    *inputs: torch.Tensor,
    weights: dict[str, torch.Tensor] | None = None,
    weights_first: bool = True,
    tracing_mode: Literal["symbolic", "fake"] = "symbolic",
) -> fx.GraphModule:
    """``fn(*inputs)`` as an ATen GraphModule, the IR torch.export produces (make_fx, pre-dispatch),
    every node carrying ``meta["val"]``. Tensors of ``weights`` that ``fn`` closes over become
    ``get_attr`` nodes named by their keys (dotted names make submodules, as in a real model), read at
    the top of the graph as capture() does, or where first used (``weights_first=False``). Sizes are
    symbolic, as in the graph the pipeline sees; ``tracing_mode="fake"`` keeps the inputs' sizes, as in
    a bucket's specialised graph."""
    traced = make_fx(fn, pre_dispatch=True, tracing_mode=tracing_mode, _allow_non_fake_inputs=True)(*inputs)
    names = {id(tensor): name for name, tensor in (weights or {}).items()}
    root: dict[str, torch.Tensor] = {}
    first_op = next(n for n in traced.graph.nodes if n.op != "placeholder")
    for node in list(traced.graph.nodes):
        if node.op == "get_attr":
            tensor = getattr(traced, node.target)
            node.target = names.get(id(tensor), node.target)
            root[node.target] = tensor
            if weights_first and node is not first_op:
                first_op.prepend(node)  # weights first, as in a captured model graph
    return fx.GraphModule(root, traced.graph)


def cleanup(gm: fx.GraphModule) -> fx.GraphModule:
    """The canonicalising cleanup the pipeline runs before any fusion (and patterns get too)."""
    for graph_pass in CANONICAL_CLEANUP:
        graph_pass(gm)
    return gm


def run(gm: fx.GraphModule, *inputs: torch.Tensor) -> Any:
    """The graph's outputs on ``inputs`` (cloned, so that mutating graphs leave them alone)."""
    gm.recompile()
    with torch.no_grad():
        return gm(*(x.clone() for x in inputs))


def count(gm: fx.GraphModule, target: Any) -> int:
    """How many call_function nodes call ``target``."""
    return sum(1 for node in gm.graph.nodes if node.op == "call_function" and node.target == target)


def code(gm: fx.GraphModule) -> str:
    """The graph's printed Python code, regenerated: passes edit the graph only."""
    gm.recompile()
    return gm.code


def assert_close(actual: Any, expected: Any, dtype: torch.dtype) -> None:
    """Outputs agree within the tolerance --verify uses for ``dtype``, relative to the largest value."""
    actual = actual if isinstance(actual, (list, tuple)) else [actual]
    expected = expected if isinstance(expected, (list, tuple)) else [expected]
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        scale = e.float().abs().max().clamp_min(1e-12)
        error = ((a.float() - e.float()).abs().max() / scale).item()
        assert error <= TOLERANCE[dtype], f"relative error {error:.3g} > {TOLERANCE[dtype]}"


def check_meta(gm: fx.GraphModule, *inputs: torch.Tensor) -> None:
    """Every node's ``meta["val"]`` has the rank, static sizes and dtype of the value it really computes
    (what a replacement's new nodes get from the matcher, and the memory planner relies on)."""

    class Checker(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            result = super().run_node(node)
            values = result if isinstance(result, (list, tuple)) else [result]
            metas = node.meta.get("val")
            metas = metas if isinstance(metas, (list, tuple)) else [metas]
            for value, meta in zip(values, metas, strict=False):
                if isinstance(value, torch.Tensor) and isinstance(meta, torch.Tensor):
                    sizes = [s if isinstance(s, int) else None for s in meta.shape]
                    assert value.dim() == len(sizes) and value.dtype == meta.dtype, (
                        f"{node.format_node()}: computes {value.dtype}{list(value.shape)}, meta says {meta}"
                    )
                    assert all(s is None or s == v for s, v in zip(sizes, value.shape, strict=True)), (
                        f"{node.format_node()}: computes {list(value.shape)}, meta says {list(meta.shape)}"
                    )
            return result

    gm.recompile()
    with torch.no_grad():
        Checker(gm).run(*(x.clone() for x in inputs))
