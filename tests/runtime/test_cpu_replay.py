"""CPU graph replay (runtime/cpu_replay.py): what is computed once, what is replayed, and equal results."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx

import xllm_compiler
from tests.runtime.conftest import SMALL_BUCKETS
from tests.runtime.test_graph_replay import prompt_sets, run_recording
from xllm_compiler.artifact.schema import FALLBACK_GRAPH
from xllm_compiler.ops.native import native_kernels
from xllm_compiler.runtime import cpu_replay
from xllm_compiler.runtime.cpu_replay import CpuGraphRunner
from xllm_compiler.runtime.platform import cpu as cpu_platform
from xllm_compiler.runtime.platform import shape_ops
from xllm_compiler.runtime.platform.cpu import CpuPlatform

CALLS: list[str] = []


def scaled_out(x: torch.Tensor, factor: float, out: torch.Tensor) -> torch.Tensor:
    """An out= op: writes ``out`` and returns it, as aten's out forms do."""
    CALLS.append("scaled_out")
    return torch.mul(x, factor, out=out)


def fresh_sum(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """An op that returns a new tensor, which later nodes read: the replay keeps it in a register."""
    CALLS.append("fresh_sum")
    return x + y


def counted_view(tensor: torch.Tensor, size: list[int]) -> torch.Tensor:
    CALLS.append("view")
    return tensor.view(size)


@pytest.fixture
def counted_shape_ops(monkeypatch):
    shape = frozenset({counted_view, shape_ops.split_with_sizes, operator.getitem})
    monkeypatch.setattr("xllm_compiler.runtime.cpu_replay.SHAPE_OPS", shape)
    CALLS.clear()


def toy_module(view=counted_view) -> fx.GraphModule:
    """x [2, 3] -> scaled into a fixed buffer, viewed, split, summed with itself into a fresh tensor, viewed."""
    root = torch.nn.Module()
    root.buffer = torch.empty(2, 3)
    graph = fx.Graph()
    x = graph.placeholder("x")
    buffer = graph.get_attr("buffer")
    scaled = graph.call_function(scaled_out, (x, 2.0), {"out": buffer})
    flat = graph.call_function(view, (scaled, [6]))
    halves = graph.call_function(shape_ops.split_with_sizes, (flat, [3, 3]))
    first, second = (graph.call_function(operator.getitem, (halves, i)) for i in range(2))
    summed = graph.call_function(fresh_sum, (first, second))
    graph.output((graph.call_function(view, (summed, [1, 3])), buffer))
    return fx.GraphModule(root, graph)


def expected_sum(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(6) * 2
    return (flat[:3] + flat[3:]).view(1, 3)


def test_shape_ops_of_fixed_tensors_run_once_and_registers_carry_fresh_values(counted_shape_ops):
    module = toy_module()
    runner = CpuGraphRunner(module)
    for step in range(3):
        x = torch.arange(6.0).view(2, 3) + step
        got = runner(x)
        assert torch.equal(got[0], expected_sum(x)) and torch.equal(got[1], x * 2)
    # Recorded: the out= op, the fresh sum, and the view of the sum (it reads a register); the first view,
    # the split and the getitems were computed once, at capture.
    assert [call.target for call in runner.calls] == [scaled_out, fresh_sum, counted_view]
    assert [call.register for call in runner.calls] == [None, 0, 1]
    assert CALLS.count("view") == 2 + 2  # capture: both views; each of the 2 replays: the one of the register
    assert got[1] is module.buffer  # the output that was a fixed tensor is that tensor


def test_a_reshape_that_copies_is_replayed_not_kept():
    """A reshape of a non-contiguous tensor copies: a copy made at capture would hold that step's values."""
    root = torch.nn.Module()
    root.buffer = torch.empty(3, 2)
    graph = fx.Graph()
    x = graph.placeholder("x")
    buffer = graph.get_attr("buffer")
    scaled = graph.call_function(scaled_out, (x, 1.0), {"out": buffer})
    transposed = graph.call_function(torch.t, (scaled,))
    graph.output((graph.call_function(shape_ops.reshape, (transposed, [6])),))
    module = fx.GraphModule(root, graph)
    runner = CpuGraphRunner(module)
    for step in range(3):
        x = torch.arange(6.0).view(3, 2) * (step + 1)
        assert torch.equal(runner(x)[0], x.t().reshape(6))
    assert shape_ops.reshape in [call.target for call in runner.calls]


def test_step_inputs_are_copied_into_fixed_buffers(counted_shape_ops):
    runner = CpuGraphRunner(toy_module())
    first = torch.ones(2, 3)
    runner(first)
    second = torch.full((2, 3), 5.0)
    assert torch.equal(runner(second)[0], expected_sum(second))
    with pytest.raises(ValueError, match=r"input 0 of a captured graph is torch.float32 \[3, 2\]"):
        runner(torch.ones(3, 2))


def test_a_graph_with_other_nodes_runs_by_its_module():
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output((graph.call_method("relu", (x,)),))
    module = fx.GraphModule(torch.nn.Module(), graph)
    runner = CpuGraphRunner(module)
    x = torch.tensor([-1.0, 2.0])
    assert not runner.recordable and torch.equal(runner(x)[0], x.relu()) and runner.calls == []


needs_native = pytest.mark.skipif(native_kernels() is None, reason="no native kernels in this build")
aten = torch.ops.aten


def mixed_module() -> fx.GraphModule:
    """One call of each kind a native program takes: our kernel (silu_and_mul_out into a buffer), ATen ops
    (a number where add.Tensor has a Tensor; a split whose list result is a register), getitems of that
    list, and a Python function reading registers."""
    root = torch.nn.Module()
    root.buffer = torch.empty(2, 4)
    graph = fx.Graph()
    x = graph.placeholder("x")
    buffer = graph.get_attr("buffer")
    graph.call_function(native_kernels().silu_and_mul_out, (x,), {"out": buffer})
    shifted = graph.call_function(aten.add.Tensor, (buffer, 0.5))
    halves = graph.call_function(aten.split.Tensor, (shifted, 1))
    first, second = (graph.call_function(operator.getitem, (halves, i)) for i in range(2))
    graph.output((graph.call_function(fresh_sum, (first, second)), buffer))
    return fx.GraphModule(root, graph)


def mixed_expected(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    activated = torch.nn.functional.silu(x[:, :4]) * x[:, 4:]
    shifted = activated + 0.5
    return shifted[:1] + shifted[1:], activated


@needs_native
def test_a_native_program_replays_kernels_ops_getitems_and_python_calls():
    CALLS.clear()
    module = mixed_module()
    runner = CpuGraphRunner(module)
    for step in range(3):
        x = torch.randn(2, 8, generator=torch.Generator().manual_seed(step))
        got = runner(x)
        expected = mixed_expected(x)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-6)
        assert got[1] is module.buffer
    assert runner.program is not None and len(runner.program) == len(runner.calls) == 6
    assert CALLS.count("fresh_sum") == 3  # through Python, at capture and at each of the 2 replays


@needs_native
def test_a_native_program_times_its_calls_while_asked_to():
    runner = CpuGraphRunner(mixed_module())
    runner(torch.randn(2, 8))
    program = runner.program
    assert program.entry_times() == []
    program.set_timing(True)
    for _ in range(2):
        runner(torch.randn(2, 8))
    times = program.entry_times()
    assert len(times) == len(program) and all(t >= 0 for t in times) and sum(times) > 0
    program.set_timing(False)
    runner(torch.randn(2, 8))
    assert program.entry_times() == []


def python_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors)


@needs_native
@pytest.mark.parametrize(("cat", "native"), [(aten.cat.default, True), (python_cat, False)])
def test_registers_inside_list_arguments(cat, native):
    """An ATen op's list item that is a register is written into the list at each step; a Python function's
    is not, and its graph keeps the Python loop."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    doubled = graph.call_function(aten.mul.Tensor, (x, 2.0))
    joined = graph.call_function(cat, ([doubled, x],))
    graph.output((joined,))
    runner = CpuGraphRunner(fx.GraphModule(torch.nn.Module(), graph))
    for step in range(3):
        x = torch.full((2,), float(step))
        assert torch.equal(runner(x)[0], torch.cat([x * 2, x]))
    assert (runner.program is not None) is native and len(runner.calls) == 2


@needs_native
def test_a_native_program_raises_what_its_kernel_raises():
    module = mixed_module()
    runner = CpuGraphRunner(module)
    runner(torch.randn(2, 8))
    module.buffer.as_strided_((2, 4), (1, 2))  # no longer contiguous: the kernel's own check refuses it
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        runner(torch.randn(2, 8))


def test_cpu_bucket_graphs_replay_and_the_fallback_runs_eagerly(small_model):
    graphs = small_model.engine.graphs
    assert CpuPlatform().graph_runner() is CpuGraphRunner
    assert isinstance(graphs.runner("decode_1"), CpuGraphRunner)
    assert graphs.runner(FALLBACK_GRAPH) is graphs.module(FALLBACK_GRAPH)


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM"])
def test_replay_gives_exactly_the_eager_logits(checkpoints, monkeypatch, architecture):
    model_dir, _ = checkpoints.checkpoint(architecture)
    artifact = checkpoints.artifact(model_dir, **SMALL_BUCKETS)
    replayed = xllm_compiler.load(artifact)
    monkeypatch.setenv("XLLM_GRAPH_REPLAY", "0")
    eager = xllm_compiler.load(artifact)
    sets = prompt_sets(replayed.vocab_size)
    expected_tokens, expected_logits = run_recording(eager, sets)
    for _ in range(2):  # the first run records each bucket graph, the second only replays
        tokens, logits = run_recording(replayed, sets)
        assert tokens == expected_tokens
        assert len(logits) == len(expected_logits) and all(map(torch.equal, logits, expected_logits))
    runner = replayed.engine.graphs.runner("decode_2")
    assert isinstance(runner, CpuGraphRunner) and runner.calls
    if native_kernels() is not None:  # every call of every bucket graph went through the native program
        runners = replayed.engine.graphs._runners.values()
        assert runners and all(r.program is not None and len(r.program) == len(r.calls) for r in runners)
    assert not isinstance(eager.engine.graphs.runner("decode_2"), CpuGraphRunner)


@needs_native
@pytest.mark.parametrize(
    ("options", "lm_head"),
    [
        ({}, "packed_linear_float"),
        ({"quantize": "int8"}, "int8_linear_float"),
        ({"quantize": "int4", "group_size": 32}, "int4_linear_float"),
    ],
)
def test_bfloat16_lm_head_and_row_selects_run_fused_with_the_same_logits(checkpoints, monkeypatch, options, lm_head):
    """A bfloat16 LM head's cast to float32 runs inside its kernel (the ``*_float`` forms, runtime/platform/cpu.py)
    and index_select.out as select_rows_out (NATIVE_OPS): every step's logits bit for bit as with the ops they
    replace."""
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM", dtype="bfloat16")
    artifact = checkpoints.artifact(model_dir, **options, **SMALL_BUCKETS)
    fused = xllm_compiler.load(artifact)
    sets = prompt_sets(fused.vocab_size)
    tokens, logits = run_recording(fused, sets)
    kernels = frozenset(native_kernels().replay_kernels())
    runners = list(fused.engine.graphs._runners.values())
    for runner in runners:
        targets = [node.target for node in runner.module.graph.nodes if node.op == "call_function"]
        assert getattr(native_kernels(), lm_head) in targets and aten.to.dtype not in targets
        selects = [call for call in runner.calls if call.target is aten.index_select.out]
        assert selects and all(cpu_replay._native_op(c, [], c.args, c.kwargs, kernels) for c in selects)
    monkeypatch.setattr(cpu_platform, "_is_float32_cast", lambda node, source: False)
    monkeypatch.setattr(cpu_replay, "NATIVE_OPS", {})
    separate = xllm_compiler.load(artifact)
    expected_tokens, expected_logits = run_recording(separate, sets)
    assert any(n.target is aten.to.dtype for n in separate.engine.graphs.module("decode_1").graph.nodes)
    assert tokens == expected_tokens
    assert len(logits) == len(expected_logits) and all(map(torch.equal, logits, expected_logits))
