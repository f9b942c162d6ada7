"""The CPU's MoE experts on packed weights (ops/cpu_linear.cpp, ops/moe.py's ``packed_*``) against the grouped
composite, which stays the reference: row counts from decode to prefill, sizes that take AMX tiles where the CPU
has them (K a multiple of 32) and sizes that do not, an odd hidden size, expert-parallel tables with replicas
and padding, routing weights in float32 and in the model dtype; and the CPU platform's lowering, which packs
the expert stacks at load and keeps no plain copy of them.

Tolerances are the dense packed kernel's (test_native_kernels.py): both sides round every intermediate to the
model dtype at the same points, only the sums inside a linear layer are ordered differently.
"""

from __future__ import annotations

import json

import pytest
import torch

from xllm_compiler.artifact.graph_format import deserialize_graph
from xllm_compiler.artifact.writer import WEIGHTS_FILE
from xllm_compiler.interface import PAD_SLOT
from xllm_compiler.ops import moe
from xllm_compiler.ops.native import native_kernels
from xllm_compiler.ops.reference import route_topk
from xllm_compiler.runtime.platform.cpu import EXPERTS, PACKED_SUFFIX, CpuPlatform, packable_dtypes
from xllm_compiler.runtime.weights import read_weights

CPU = torch.device("cpu")
NUM_EXPERTS, TOP_K = 6, 2
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}
PACKED_DTYPES = [d for d in (torch.float32, torch.bfloat16) if d in packable_dtypes()]
pytestmark = pytest.mark.skipif(not PACKED_DTYPES, reason="this build packs no linear layers")


def _inputs(tokens: int, hidden: int, intermediate: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=generator).to(dtype)
    logits = torch.randn(tokens, NUM_EXPERTS, generator=generator)
    gate_up = (0.3 * torch.randn(NUM_EXPERTS, 2 * intermediate, hidden, generator=generator)).to(dtype)
    down = (0.3 * torch.randn(NUM_EXPERTS, hidden, intermediate, generator=generator)).to(dtype)
    return x, logits, gate_up, down


def _packed(gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    native = native_kernels()
    return native.pack_expert_weights(gate_up), native.pack_expert_weights(down)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    tol = TOLERANCE[actual.dtype]
    scale = max(expected.float().abs().max().item(), 1.0)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


def test_the_pack_is_each_experts_packed_linear_weight():
    for dtype in PACKED_DTYPES:
        stack = torch.randn(3, 100, 37).to(dtype)  # a partial block, an odd K
        expected = torch.stack([native_kernels().pack_linear_weight(w) for w in stack])
        assert torch.equal(native_kernels().pack_expert_weights(stack), expected)


@pytest.mark.parametrize("dtype", PACKED_DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 3, 8, 64, 512])
@pytest.mark.parametrize(("hidden", "intermediate"), [(64, 96), (64, 48), (37, 24)], ids=["x32", "even", "odd-hidden"])
def test_matches_the_grouped_composite(dtype, tokens, hidden, intermediate):
    x, logits, gate_up, down = _inputs(tokens, hidden, intermediate, dtype)
    weights, ids = route_topk(logits, TOP_K, renormalise=True)
    expected = moe.moe_experts_kernel(x, weights, ids, gate_up, down)
    out = torch.full_like(x, float("nan"))
    moe.packed_moe_experts_out(x, weights, ids, *_packed(gate_up, down), out, intermediate=intermediate)
    _close(out, expected)
    functional = moe.packed_moe_experts(x, weights, ids, *_packed(gate_up, down), intermediate=intermediate)
    assert torch.equal(functional, out)


@pytest.mark.parametrize("dtype", PACKED_DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 8, 64])
def test_expert_parallel_tables_and_counts_match(dtype, tokens):
    """A rank's share under a placement plan: 2 replicas per expert, some served elsewhere (-1), padding tokens
    (the reserved slot) computed but not counted."""
    x, logits, gate_up, down = _inputs(tokens, 48, 40, dtype, seed=1)
    weights, ids = route_topk(logits, TOP_K, renormalise=False)
    rows = torch.tensor([0, -1, 1, 2, -1, -1, 3, 3, 4, -1, -1, 5])  # [E * 2]: this rank's row per (expert, column)
    slots = torch.arange(tokens) * 3 + PAD_SLOT + 1
    slots[-1] = PAD_SLOT
    routing = dict(expert_table=rows, replicas=2, slot_mapping=slots)
    expected, expected_counts = torch.empty_like(x), torch.zeros(NUM_EXPERTS + 1, dtype=torch.int64)
    moe.moe_experts_out_kernel(x, weights, ids, gate_up, down, expected, expert_counts=expected_counts, **routing)
    out, counts = torch.full_like(x, float("nan")), torch.zeros(NUM_EXPERTS + 1, dtype=torch.int64)
    packed = _packed(gate_up, down)
    moe.packed_moe_experts_out(x, weights, ids, *packed, out, expert_counts=counts, intermediate=40, **routing)
    _close(out, expected)
    assert torch.equal(counts, expected_counts) and counts[-1] == tokens - 1
    none_here = torch.full_like(rows, -1)  # a rank that serves none of these experts gives zeros
    empty = moe.packed_moe_experts(x, weights, ids, *packed, none_here, 2, None, slots, intermediate=40)
    assert torch.equal(empty, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", PACKED_DTYPES, ids=str)
@pytest.mark.parametrize("weights_in_hidden_dtype", [False, True])
@pytest.mark.parametrize("renormalise", [False, True])
def test_fused_moe_matches_the_composite(dtype, weights_in_hidden_dtype, renormalise):
    x, logits, gate_up, down = _inputs(9, 37, 24, dtype, seed=2)
    options = (TOP_K, renormalise, weights_in_hidden_dtype)
    expected = moe.fused_moe_kernel(x, logits.to(dtype), gate_up, down, *options)
    packed = moe.packed_fused_moe(x, logits.to(dtype), *_packed(gate_up, down), *options, intermediate=24)
    _close(packed, expected)
    out = torch.full_like(x, float("nan"))
    moe.packed_fused_moe_out(x, logits.to(dtype), *_packed(gate_up, down), *options, out, intermediate=24)
    assert torch.equal(out, packed)


def test_an_expert_id_out_of_range_is_refused():
    x, logits, gate_up, down = _inputs(2, 48, 40, PACKED_DTYPES[0])
    weights, _ = route_topk(logits, TOP_K, renormalise=True)
    ids = torch.tensor([[0, NUM_EXPERTS], [1, 2]])
    with pytest.raises(RuntimeError, match="out of range"):
        moe.packed_moe_experts(x, weights, ids, *_packed(gate_up, down), intermediate=40)


def _stacks(node) -> list:
    """The gate_up and down arguments of an MoE op call."""
    arguments = dict(zip([a.name for a in node.target._schema.arguments], node.args, strict=False)) | node.kwargs
    return [arguments["gate_up"], arguments["down"]]


def test_the_cpu_platform_packs_the_expert_stacks_and_drops_the_plain(checkpoints):
    model_dir, _ = checkpoints.checkpoint("MixtralForCausalLM")
    artifact = checkpoints.artifact(model_dir)
    graphs = {
        p.stem: deserialize_graph(json.loads(p.read_text()), CPU, where=p.name) for p in artifact.glob("graphs/*.json")
    }
    stacks = {stack.target for g in graphs.values() for n in g.nodes if n.target in EXPERTS for stack in _stacks(n)}
    assert stacks  # gate_up_proj and down_proj of every MoE layer
    platform = CpuPlatform()
    weights = read_weights(artifact / WEIGHTS_FILE, CPU, platform.weight_preparer(graphs))
    platform.lower(graphs, weights)
    assert not stacks & weights.keys() and {name + PACKED_SUFFIX for name in stacks} <= weights.keys()
    calls = [n for g in graphs.values() for n in g.nodes if n.op == "call_function"]
    assert not [n for n in calls if n.target in EXPERTS]
    lowered = [n for n in calls if n.target in moe.PACKED_KERNELS.values()]
    assert lowered and all(n.kwargs["intermediate"] > 0 for n in lowered)
