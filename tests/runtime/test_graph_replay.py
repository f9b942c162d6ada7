"""Graph replay (runtime/replay.py): the fixed-address input buffers and the runner seam, on CPU; capture and
replay against eager execution where a GPU (``gpu``) or an NPU (``npu``) exists."""

from __future__ import annotations

import time
from functools import partial

import pytest
import torch

import xllm_compiler
from tests.hf_oracle import mixed_prompts
from tests.runtime.conftest import SMALL_BUCKETS
from xllm_compiler.interface import STEP_INPUTS
from xllm_compiler.runtime.platform.base import Platform
from xllm_compiler.runtime.platform.cpu import CpuPlatform
from xllm_compiler.runtime.replay import CudaGraphRunner, StaticInputs, TorchairRunner, runner_factory
from xllm_compiler.runtime.requests import Request, SamplingParams

#: Prompt sets whose steps take every graph: prefill_16, decode_1, decode_2 and, for three sequences, the
#: fallback graph.
LENGTHS = ((5,), (5, 12), (5, 12, 7))
NEW_TOKENS = 6


def step_inputs(num_tokens: int, num_seqs: int, seed: int) -> list[torch.Tensor]:
    rng = torch.Generator().manual_seed(seed)
    size = {"num_tokens": num_tokens, "num_seqs": num_seqs, "max_blocks_per_seq": 4}
    return [
        torch.randint(0, 99, [size[d] for d in spec.shape], generator=rng, dtype=spec.dtype) for spec in STEP_INPUTS
    ]


def test_static_inputs_keep_their_addresses_and_take_each_steps_values():
    kv = [torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)]
    first = step_inputs(8, 2, seed=0)
    static = StaticInputs([*first, *kv])
    addresses = [t.data_ptr() for t in static.args]
    for seed in range(3):
        step = step_inputs(8, 2, seed)
        args = static.copy_in([*step, *kv])
        assert [t.data_ptr() for t in args] == addresses
        for got, expected in zip(args[: len(STEP_INPUTS)], step, strict=True):
            assert torch.equal(got, expected) and got.data_ptr() != expected.data_ptr()
        assert args[len(STEP_INPUTS) :] == tuple(kv)  # the cache is passed as it is, never copied


def test_static_inputs_refuse_what_a_captured_graph_cannot_take():
    kv = [torch.zeros(2, 3, 4)]
    static = StaticInputs([*step_inputs(8, 2, seed=0), *kv])
    with pytest.raises(ValueError, match=r"input 0 of a captured graph is torch.int64 \[4\], it was captured with"):
        static.copy_in([*step_inputs(4, 2, seed=0), *kv])
    with pytest.raises(ValueError, match="input 7 of a captured graph moved since the capture"):
        static.copy_in([*step_inputs(8, 2, seed=0), torch.zeros(2, 3, 4)])
    with pytest.raises(ValueError, match="a captured graph takes 8 inputs, got 7"):
        static.copy_in(step_inputs(8, 2, seed=0))


class StaticInputRunner:
    """What CudaGraphRunner does around its capture, without one: run the graph on StaticInputs' buffers."""

    def __init__(self, module):
        self.module = module
        self.inputs: StaticInputs | None = None

    def __call__(self, *args):
        self.inputs = self.inputs or StaticInputs(args)
        return self.module(*self.inputs.copy_in(args))


def prompt_sets(vocab_size: int) -> list[list[list[int]]]:
    return [mixed_prompts(vocab_size, lengths=lengths, seed=4) for lengths in LENGTHS]


def run_recording(model, sets: list[list[list[int]]]) -> tuple[list[list[list[int]]], list[torch.Tensor]]:
    """(greedy tokens of each prompt set, every step's logits), each set run whole on a scheduler that lets its
    sequences decode together (three of them: more than decode_2 holds)."""
    seen: list[torch.Tensor] = []
    step = model.engine.step
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)

    def recording(phase, work):
        logits = step(phase, work)
        seen.append(logits.clone())
        return logits

    def greedy(prompts: list[list[int]]) -> list[list[int]]:
        with torch.inference_mode():
            out = model.make_scheduler(max_num_seqs=3).run(Request(str(i), p, params) for i, p in enumerate(prompts))
        return [[t for o in out[str(i)] for t in o.new_tokens] for i in range(len(prompts))]

    model.engine.step = recording
    try:
        return [greedy(prompts) for prompts in sets], seen
    finally:
        del model.engine.step


@pytest.mark.parametrize("max_resident_graphs", [None, 1])
def test_bucket_graphs_run_through_the_platforms_runner(small_artifact, small_model, monkeypatch, max_resident_graphs):
    sets = prompt_sets(small_model.vocab_size)
    expected_tokens, expected_logits = run_recording(small_model, sets)
    monkeypatch.setattr(CpuPlatform, "graph_runner", lambda self: StaticInputRunner)
    model = xllm_compiler.load(small_artifact, max_resident_graphs=max_resident_graphs)
    graphs = model.engine.graphs

    tokens, logits = run_recording(model, sets)
    assert tokens == expected_tokens
    assert len(logits) == len(expected_logits) and all(map(torch.equal, logits, expected_logits))
    assert model.stats()["fallbacks"] > 0  # three sequences: the dynamic graph ran too, eagerly
    assert graphs.runner("dynamic") is graphs.module("dynamic")
    runner = graphs.runner("decode_2")
    assert isinstance(runner, StaticInputRunner) and runner.module is graphs.module("decode_2")
    if max_resident_graphs == 1:
        graphs.module("decode_1")  # evicts decode_2, and its runner with it
        assert graphs.runner("decode_2") is not runner
    else:
        assert runner.inputs is not None  # it ran the decode steps of two sequences
        addresses = [t.data_ptr() for t in runner.inputs.args]
        assert run_recording(model, sets[1:2])[0] == expected_tokens[1:2]
        assert graphs.runner("decode_2") is runner and [t.data_ptr() for t in runner.inputs.args] == addresses


def test_bucket_graphs_trace_whole_for_torchair(small_artifact, monkeypatch):
    """TorchairRunner's torch.compile (fullgraph, static shapes, static addresses) on dynamo's eager backend:
    the trace torchair would compile has no graph break and gives the same logits. CPU lowering is left out
    (it calls kernels dynamo cannot trace; CPU never compiles), so the graphs call the ops an NPU's do."""
    monkeypatch.setattr(CpuPlatform, "lower", Platform.lower)
    monkeypatch.setattr(CpuPlatform, "weight_preparer", Platform.weight_preparer)
    eager = xllm_compiler.load(small_artifact)
    sets = prompt_sets(eager.vocab_size)
    expected_tokens, expected_logits = run_recording(eager, sets)
    monkeypatch.setattr(CpuPlatform, "graph_runner", lambda self: partial(TorchairRunner, backend="eager"))
    model = xllm_compiler.load(small_artifact)
    tokens, logits = run_recording(model, sets)
    assert tokens == expected_tokens
    for got, expected in zip(logits, expected_logits, strict=True):
        torch.testing.assert_close(got, expected)
    assert isinstance(model.engine.graphs.runner("decode_2"), TorchairRunner)


def test_replay_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(CpuPlatform, "graph_runner", lambda self: StaticInputRunner)
    assert runner_factory(CpuPlatform()) is StaticInputRunner
    monkeypatch.setenv("XLLM_GRAPH_REPLAY", "0")
    assert runner_factory(CpuPlatform()) is None


DEVICES = [
    pytest.param("cuda", CudaGraphRunner, marks=pytest.mark.gpu),
    pytest.param("npu", TorchairRunner, marks=pytest.mark.npu),
]


def load_both(checkpoints, llama, device, monkeypatch):
    """(replayed, eager) loads of one tiny artifact compiled for ``device``."""
    artifact = checkpoints.artifact(llama[0], device=device, **SMALL_BUCKETS)
    replayed = xllm_compiler.load(artifact)
    with monkeypatch.context() as env:
        env.setenv("XLLM_GRAPH_REPLAY", "0")
        eager = xllm_compiler.load(artifact)
    return replayed, eager


@pytest.mark.parametrize(("device", "runner_type"), DEVICES)
def test_replay_gives_the_eager_logits(checkpoints, llama, monkeypatch, device, runner_type):
    replayed, eager = load_both(checkpoints, llama, device, monkeypatch)
    sets = prompt_sets(replayed.vocab_size)
    expected_tokens, expected_logits = run_recording(eager, sets)
    for _ in range(2):  # the first run captures each bucket graph, the second only replays
        tokens, logits = run_recording(replayed, sets)
        assert tokens == expected_tokens
        for got, expected in zip(logits, expected_logits, strict=True):
            torch.testing.assert_close(got, expected)
    assert isinstance(replayed.engine.graphs.runner("decode_1"), runner_type)
    assert not isinstance(eager.engine.graphs.runner("decode_1"), runner_type)


@pytest.mark.parametrize(("device", "runner_type"), DEVICES)
def test_decode_speed_with_and_without_replay_is_printed(checkpoints, llama, monkeypatch, device, runner_type):
    """Prints decode tokens/s at batch 1 both ways (run with -s to see it); asserts only equal tokens."""
    replayed, eager = load_both(checkpoints, llama, device, monkeypatch)
    prompt = mixed_prompts(replayed.vocab_size, lengths=(8,), seed=5)
    new_tokens = SMALL_BUCKETS["max_seq_len"] - 8
    rates, outputs = {}, {}
    for name, model in (("replay", replayed), ("eager", eager)):
        model.generate(prompt, max_new_tokens=2, ignore_eos=True)  # builds (and captures) the graphs
        start = time.perf_counter()
        outputs[name] = model.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True)
        rates[name] = new_tokens / (time.perf_counter() - start)
    assert isinstance(replayed.engine.graphs.runner("decode_1"), runner_type)
    measured = ", ".join(f"{name} {rate:.0f} tok/s" for name, rate in rates.items())
    print(f"\n{device} decode, batch 1, {new_tokens} tokens: {measured}")
    assert outputs["replay"] == outputs["eager"]
