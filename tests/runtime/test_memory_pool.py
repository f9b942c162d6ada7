"""The runtime's memory: one activation arena sized for the largest bucket plan, whose buffers keep their
addresses and really receive the activations; and the KV pool, sized by kv_blocks or max_memory_utilization
(API and xllm-run), where requests that do not fit together wait without changing anyone's answer, and whose
occupancy and fragmentation memory_stats() reports. All on the bundled tiny Llama, compiled with default
buckets and the planner on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.profiler import ProfilerActivity, profile, record_function

import xllm_compiler
from tests.hf_oracle import mixed_prompts
from xllm_compiler.artifact.graph_format import read_memory_plan
from xllm_compiler.artifact.manifest import read_manifest
from xllm_compiler.buckets import DECODE, PREFILL
from xllm_compiler.errors import OptionsError
from xllm_compiler.interface import ARENA_PREFIX, RESERVED_BLOCKS
from xllm_compiler.run import main as run_main
from xllm_compiler.runtime.kv_cache import KVCache
from xllm_compiler.runtime.platform.cpu import CpuPlatform
from xllm_compiler.runtime.step import Sequence

TINY_LLAMA = Path(__file__).resolve().parents[2] / "tools" / "tiny-llama"
NEW_TOKENS = 12
STATS_KEYS = {
    "arena_bytes",
    "weight_bytes",
    "kv_pool_sized_by",
    "arena_bytes_per_bucket",
    "kv_cache_bytes",
    "kv_blocks_total",
    "kv_blocks_used",
    "kv_blocks_free",
    "kv_blocks_peak",
    "kv_block_size",
    "kv_bytes_per_token",  # MLA models add expanded_kv_bytes_per_token (tests/test_deepseek_parity.py)
    "kv_fragmentation",
    "kv_peak_fragmentation",
}


@pytest.fixture(scope="module")
def artifact(checkpoints) -> Path:
    return checkpoints.artifact(TINY_LLAMA, cache_dir="")


@pytest.fixture(scope="module")
def reference(artifact):
    """A model with the default pool (room for every request here at once), for expected outputs only."""
    return xllm_compiler.load(artifact)


@pytest.fixture(scope="module")
def prompts(reference) -> list[list[int]]:
    return mixed_prompts(reference.vocab_size, lengths=(9, 3, 30, 17, 5), seed=11)


@pytest.fixture(scope="module")
def expected(reference, prompts) -> list[list[int]]:
    """Each prompt's greedy continuation, generated alone."""
    return [reference.generate([p], max_new_tokens=NEW_TOKENS, ignore_eos=True)[0] for p in prompts]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def plans(artifact: Path) -> dict[str, dict]:
    """Each bucket graph's buffers (get_attr target -> ArenaBuffer), as the graph files store them."""
    result = {}
    for name, rel in read_manifest(artifact).graph_files().items():
        arena_bytes, buffers = read_memory_plan(json.loads((artifact / rel).read_text()), where=rel)
        if arena_bytes:
            result[name] = buffers
    return result


def blocks_of(tokens: int, block_size: int = 16) -> int:
    return -(-tokens // block_size)


# -- the activation arena -------------------------------------------------------------------------------------


def test_arena_is_one_tensor_sized_for_the_largest_plan(artifact):
    model = xllm_compiler.load(artifact)
    stats = model.memory_stats()
    assert set(stats) == STATS_KEYS
    report = json.loads((artifact / "report.json").read_text())
    per_bucket = stats["arena_bytes_per_bucket"]
    assert per_bucket == {name: summary["arena_bytes"] for name, summary in report["memory"].items()}
    assert len(per_bucket) == 9 and "dynamic" not in per_bucket
    assert stats["arena_bytes"] == max(per_bucket.values()) == per_bucket["prefill_512"]
    arena = model.engine.graphs.arena
    assert arena.dtype == torch.uint8 and arena.dim() == 1 and arena.numel() == stats["arena_bytes"]
    assert arena.data_ptr() % 64 == 0


def buffer_addresses(model, artifact) -> dict[tuple[str, str], int]:
    """(bucket, buffer) -> the address of that buffer in the bucket's module, after checking it is the plan's
    view of the arena: same storage, at the plan's offset, with the plan's shape and dtype."""
    graphs = model.engine.graphs
    arena = graphs.arena
    base, end = arena.data_ptr(), arena.data_ptr() + arena.numel()
    addresses = {}
    for bucket, buffers in plans(artifact).items():
        module = graphs.module(bucket)
        assert hasattr(module, ARENA_PREFIX.rstrip("."))
        for target, planned in buffers.items():
            tensor = module.get_buffer(target)
            assert tensor.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr(), target
            assert tensor.data_ptr() - base == planned.offset, f"{bucket} {target}"
            assert tensor.data_ptr() + tensor.numel() * tensor.element_size() <= end, f"{bucket} {target}"
            assert (tuple(tensor.shape), tensor.dtype) == (planned.shape, planned.dtype), f"{bucket} {target}"
            assert tensor.data_ptr() % 64 == 0
            addresses[bucket, target] = tensor.data_ptr()
    return addresses


@pytest.mark.parametrize("max_resident_graphs", [None, 1])
def test_bucket_buffers_are_fixed_views_of_the_arena(artifact, prompts, expected, max_resident_graphs):
    model = xllm_compiler.load(artifact, max_resident_graphs=max_resident_graphs)
    arena = model.engine.graphs.arena
    before = buffer_addresses(model, artifact)
    assert before
    for _ in range(2):
        assert model.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True) == expected
        assert model.generate(prompts[:1], max_new_tokens=3, ignore_eos=True) == [expected[0][:3]]
        # Modules rebuilt after eviction (max_resident_graphs=1) bind the very same views again.
        assert buffer_addresses(model, artifact) == before
    assert model.engine.graphs.arena is arena
    if max_resident_graphs == 1:
        assert len(model.engine.graphs.resident()) == 1


def lm_head_input(module) -> str:
    """The arena buffer the LM head reads: the final norm's output."""
    for node in module.graph.nodes:
        reads = [a for a in node.args if getattr(a, "op", None) == "get_attr"]
        if any(a.target.startswith("lm_head.weight") for a in reads):
            assert node.args[0].op == "get_attr" and node.args[0].target.startswith(ARENA_PREFIX)
            return node.args[0].target
    raise AssertionError("no LM head in the graph")


def test_activations_are_written_into_the_arena(artifact):
    model = xllm_compiler.load(artifact)
    graphs = model.engine.graphs
    lm_head = load_file(str(TINY_LLAMA / "model.safetensors"))["lm_head.weight"]
    prompt = mixed_prompts(model.vocab_size, lengths=(20,), seed=3)[0]

    # Prefill (bucket prefill_32): the logits are the LM head applied to what the arena holds.
    graphs.arena.zero_()
    logits = model.logits([prompt])
    assert graphs.resident() == ["prefill_32"]
    hidden = graphs.module("prefill_32").get_buffer(lm_head_input(graphs.module("prefill_32")))
    assert hidden.shape == (8, lm_head.shape[1])  # one row per sequence slot of the bucket
    torch.testing.assert_close(F.linear(hidden[0], lm_head), logits[0], rtol=1e-5, atol=1e-5)
    assert graphs.arena[: model.memory_stats()["arena_bytes_per_bucket"]["prefill_32"]].any()
    assert not graphs.arena[model.memory_stats()["arena_bytes_per_bucket"]["prefill_32"] :].any()

    # Decode (bucket decode_1 runs the second step): its final hidden state is in the arena too.
    graphs.arena.zero_()
    (tokens,) = model.generate([prompt], max_new_tokens=2, ignore_eos=True)
    decode = graphs.module("decode_1")
    hidden = decode.get_buffer(lm_head_input(decode))
    assert hidden.shape == (1, lm_head.shape[1]) and hidden.abs().sum() > 0
    assert int(F.linear(hidden[0], lm_head).argmax()) == tokens[-1]


def allocations_inside_graph_calls(model, run) -> list[int]:
    """Bytes of every allocation made inside a bucket graph call while ``run()`` runs (torch.profiler)."""
    graphs = model.engine.graphs
    runner = graphs.runner

    def labelled(name: str):
        graph = runner(name)

        def call(*args):
            with record_function("bucket graph"):
                return graph(*args)

        return call

    graphs.runner = labelled
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
    finally:
        del graphs.runner

    def inside(event) -> bool:
        parent = event.cpu_parent
        while parent is not None and parent.name != "bucket graph":
            parent = parent.cpu_parent
        return parent is not None

    # Each allocation once, in the event that made it: an event's cpu_memory_usage includes its children's.
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0 and inside(e)]


@pytest.mark.parametrize("batch", [1, 3])
def test_steady_decode_allocates_nothing_but_the_logits(artifact, batch):
    """After warm-up, a decode step's graph writes every intermediate into the arena, linear layers and
    the embedding included: the one allocation inside the call is the logits it returns."""
    model = xllm_compiler.load(artifact)
    engine = model.engine
    seqs = [Sequence(tokens=list(range(1, 9 + i)), prompt_len=8 + i) for i in range(batch)]
    for seq in seqs:
        seq.blocks = engine.pool.allocate(engine.blocks_for(seq.prompt_len + 8))

    def decode() -> None:
        for seq in seqs:
            seq.tokens.append(5)
        engine.step(DECODE, [(seq, 1) for seq in seqs])

    with torch.inference_mode():
        engine.step(PREFILL, [(seq, len(seq.tokens)) for seq in seqs])
        for _ in range(3):
            decode()
        allocated = allocations_inside_graph_calls(model, decode)
    rows = next(b for b in (1, 2, 4, 8) if b >= batch)  # the decode bucket the step runs on
    assert allocated == [rows * model.vocab_size * 4], allocated  # float32 logits, one row per bucket slot


# -- the KV pool: kv_blocks and max_memory_utilization ----------------------------------------------------------


def pool_costs(artifact: Path, reference) -> tuple[int, int]:
    """(bytes the weights and arena take, bytes of one KV block), as load() counts them: the weights by
    their file's size in the manifest."""
    manifest = read_manifest(artifact)
    model = manifest.model
    block_bytes = KVCache.bytes_per_block(
        model.num_layers, manifest.kv_cache.block_size, model.num_kv_heads, model.head_dim, torch.float32
    )
    used = manifest.weight_bytes + reference.memory_stats()["arena_bytes"]
    return used, block_bytes


@pytest.fixture
def device_memory(monkeypatch):
    """Pretend the CPU has ``total`` bytes (max_memory_utilization is a share of it), so pools stay small."""

    def pretend(total: int) -> None:
        monkeypatch.setattr(CpuPlatform, "total_memory_bytes", lambda self: total)

    return pretend


def test_more_utilization_gives_more_blocks(artifact, reference, device_memory):
    used, block_bytes = pool_costs(artifact, reference)
    device_memory(2 * (used + 40 * block_bytes))  # half of it leaves exactly 40 blocks after weights and arena
    totals = []
    for utilization in (0.5, 0.6, 0.75, 0.9, 1.0, 1):
        model = xllm_compiler.load(artifact, max_memory_utilization=utilization)
        stats = model.memory_stats()
        budget = utilization * 2 * (used + 40 * block_bytes) - used
        assert math.floor(budget / block_bytes) - 1 <= stats["kv_blocks_total"] <= math.floor(budget / block_bytes)
        assert stats["kv_cache_bytes"] == (stats["kv_blocks_total"] + RESERVED_BLOCKS) * block_bytes
        totals.append(stats["kv_blocks_total"])
    assert totals == sorted(totals) and totals[0] < totals[-2] == totals[-1]
    assert totals[0] in (39, 40)


def test_utilization_is_a_ceiling_on_weights_arena_and_kv_cache(artifact, reference, device_memory):
    used, block_bytes = pool_costs(artifact, reference)
    total = 2 * (used + 40 * block_bytes)
    device_memory(total)
    for utilization in (0.5, 0.75, 1.0):
        stats = xllm_compiler.load(artifact, max_memory_utilization=utilization).memory_stats()
        assert used + stats["kv_cache_bytes"] <= utilization * total, utilization


@pytest.mark.parametrize("spare_blocks", [-10, 0, 0.5])
def test_utilization_leaving_no_room_is_refused(artifact, reference, device_memory, spare_blocks):
    used, block_bytes = pool_costs(artifact, reference)
    device_memory(int(2 * (used + spare_blocks * block_bytes)))
    with pytest.raises(OptionsError, match=r"max_memory_utilization 0\.5 leaves no room"):
        xllm_compiler.load(artifact, max_memory_utilization=0.5)


@pytest.mark.parametrize("utilization", [0, -0.5, 1.01, 2, float("nan"), float("inf"), True, "0.9"])
def test_bad_utilization_values_are_refused(artifact, utilization):
    with pytest.raises(OptionsError, match="max_memory_utilization must be in"):
        xllm_compiler.load(artifact, max_memory_utilization=utilization)


def test_kv_blocks_overrides_utilization(artifact, reference, device_memory):
    used, block_bytes = pool_costs(artifact, reference)
    device_memory(used // 2)  # any utilization would leave no room ...
    model = xllm_compiler.load(artifact, kv_blocks=7, max_memory_utilization=0.5)  # ... but kv_blocks decides
    stats = model.memory_stats()
    assert stats["kv_blocks_total"] == 6 and stats["kv_cache_bytes"] == 7 * block_bytes


def test_small_pool_requests_wait_and_answer_as_alone(artifact, prompts, expected):
    needed = [blocks_of(len(p) + NEW_TOKENS) for p in prompts]
    capacity = max(needed) + 1
    assert sum(needed) > capacity  # they cannot all run at once
    model = xllm_compiler.load(artifact, kv_blocks=capacity + RESERVED_BLOCKS)
    assert model.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True) == expected
    stats = model.memory_stats()
    assert stats["kv_blocks_total"] == capacity and stats["kv_blocks_peak"] <= capacity
    assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_free"] == capacity


# -- xllm-run --kv-blocks / --max-memory-utilization --------------------------------------------------------------


def run(capsys, *argv) -> tuple[int, str, str]:
    code = run_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def ids(prompt: list[int]) -> str:
    return ",".join(map(str, prompt))


@pytest.fixture
def loaded(monkeypatch) -> list:
    """The models xllm-run loads in this process, to read their memory_stats() afterwards."""
    models = []
    load = xllm_compiler.load

    def recording_load(*args, **kwargs):
        models.append(load(*args, **kwargs))
        return models[-1]

    monkeypatch.setattr(xllm_compiler, "load", recording_load)
    return models


def test_cli_request_that_can_never_fit_exits_2(artifact, prompts, capsys):
    # 3 blocks, one reserved: 32 tokens of room; 20 + 20 tokens need 3 blocks.
    long_prompt = mixed_prompts(512, lengths=(20,), seed=2)[0]
    argv = [artifact, "--kv-blocks", 3, "--max-new-tokens", 20, "--prompt-ids", ids(prompts[1])]
    code, out, err = run(capsys, *argv, "--prompt-ids", ids(long_prompt))
    assert code == 2
    assert out == ""  # refused up front: not even the request that fits ran
    assert len(err.splitlines()) == 1 and err.startswith("xllm-run: error:")
    assert "KV blocks" in err and "needs 3" in err and "has 2" in err


def test_cli_small_pool_requests_wait_and_answer_as_alone(artifact, prompts, expected, capsys, loaded):
    capacity = max(blocks_of(len(p) + NEW_TOKENS) for p in prompts) + 1
    argv = [artifact, "--kv-blocks", capacity + RESERVED_BLOCKS, "--max-new-tokens", NEW_TOKENS, "--ignore-eos"]
    for prompt in prompts:
        argv += ["--prompt-ids", ids(prompt)]
    code, out, err = run(capsys, *argv)
    assert (code, err) == (0, "")
    assert out.splitlines() == [ids(tokens) for tokens in expected]
    (model,) = loaded
    stats = model.memory_stats()
    assert stats["kv_blocks_total"] == capacity and 0 < stats["kv_blocks_peak"] <= capacity
    assert stats["kv_blocks_used"] == 0


def test_cli_max_memory_utilization_sizes_the_pool(
    artifact, reference, prompts, expected, capsys, loaded, device_memory
):
    used, block_bytes = pool_costs(artifact, reference)
    device_memory(2 * (used + 5 * block_bytes) + block_bytes // 2)  # half of it: 5 blocks and a bit
    argv = [artifact, "--max-memory-utilization", 0.5, "--max-new-tokens", NEW_TOKENS, "--ignore-eos"]
    for prompt in prompts:
        argv += ["--prompt-ids", ids(prompt)]
    code, out, err = run(capsys, *argv)
    assert (code, err) == (0, "")
    assert out.splitlines() == [ids(tokens) for tokens in expected]
    (model,) = loaded
    capacity = model.memory_stats()["kv_blocks_total"]
    assert capacity in (4, 5) and capacity < sum(blocks_of(len(p) + NEW_TOKENS) for p in prompts)
    assert model.memory_stats()["kv_blocks_peak"] <= capacity


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-memory-utilization", "1.5"], "max_memory_utilization must be in"),
        (["--max-memory-utilization", "0"], "max_memory_utilization must be in"),
        (["--max-memory-utilization", "0.000001"], "max_memory_utilization 1e-06 leaves no room"),
        (["--kv-blocks", "1"], "kv_blocks must be an integer > 1"),
        (["--kv-blocks", "0"], "kv_blocks must be an integer > 1"),
    ],
)
def test_cli_bad_pool_options_exit_2_with_one_line(artifact, reference, capsys, device_memory, argv, message):
    used, _ = pool_costs(artifact, reference)
    device_memory(4 * used)
    code, out, err = run(capsys, artifact, "--prompt-ids", "1,2,3", *argv)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and message in err, err


# -- occupancy and fragmentation --------------------------------------------------------------------------------


def test_fragmentation_stats(artifact):
    model = xllm_compiler.load(artifact)
    stats = model.memory_stats()
    assert stats["kv_fragmentation"] == stats["kv_peak_fragmentation"] == 0.0
    assert stats["kv_blocks_used"] == stats["kv_blocks_peak"] == 0

    # A prompt of exactly two blocks, prefilled only: every reserved slot holds a token.
    model.logits([list(range(10, 42))])
    stats = model.memory_stats()
    assert stats["kv_peak_fragmentation"] == 0.0 and stats["kv_blocks_peak"] == 2

    # Blocks grow with a sequence: 3 tokens in 1 block of 16 after the prefill, 22 in 2 blocks at the end.
    model.generate([[1, 2, 3]], max_new_tokens=20, ignore_eos=True)
    stats = model.memory_stats()
    for key in ("kv_fragmentation", "kv_peak_fragmentation"):
        assert 0.0 <= stats[key] <= 1.0
    assert stats["kv_peak_fragmentation"] == pytest.approx(1 - 3 / 16, abs=1e-4)
    assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert stats["kv_fragmentation"] == 0.0  # nothing is held any more

    # Several requests waiting on a small pool: the fields stay in range and everything is given back.
    small = xllm_compiler.load(artifact, kv_blocks=4)
    small.generate(mixed_prompts(512, lengths=(4, 20, 7), seed=9), max_new_tokens=10, ignore_eos=True)
    stats = small.memory_stats()
    assert 0.0 < stats["kv_peak_fragmentation"] <= 1.0 and 0.0 <= stats["kv_fragmentation"] <= 1.0
    assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_peak"] <= 3
