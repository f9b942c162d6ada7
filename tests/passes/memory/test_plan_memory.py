"""plan_memory: the quality of the plan (arena against the lower bound and the naive sum) on every default
bucket of the bundled tiny Llama, of each architecture's tiny config and of a full-width ~100M Llama; that no
two buffers alive at once share a byte; that every planned op writes into its arena buffer; and that a
planned graph (graph level, arena full of NaN) and a planned artifact (runtime level) compute exactly what
the unplanned ones do."""

from __future__ import annotations

import json
import random
import re
import shutil
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

import xllm_compiler
from tests.hf_oracle import mixed_prompts
from tests.passes.graphs import ARCHITECTURES
from tests.passes.graphs import _build_graph as original_build_graph
from tests.passes.memory import (
    TINY_LLAMA,
    ModelBuckets,
    aligned,
    checkpoint_buckets,
    default_buckets,
    nbytes,
    peak_live_bytes,
    runnable,
    tiny_config_buckets,
)
from xllm_compiler import testing
from xllm_compiler.artifact.graph_format import read_memory_plan
from xllm_compiler.artifact.manifest import read_manifest
from xllm_compiler.interface import ARENA_PREFIX, STEP_INPUTS
from xllm_compiler.ops import OUT_FORMS
from xllm_compiler.passes.memory.liveness import Liveness, Storage
from xllm_compiler.passes.memory.plan_memory import ALIGNMENT, Buffer, MemoryPlan, greedy_by_size, plan_memory
from xllm_compiler.passes.verify import TOLERANCE
from xllm_compiler.runtime.requests import Request, SamplingParams
from xllm_compiler.runtime.step import Sequence, build_step_inputs

MAX_RATIO = 1.05
SUMMARY_KEYS = {"arena_bytes", "lower_bound_bytes", "naive_bytes", "planned_nodes", "unplanned_nodes"}
TINY_BUCKETS = [b.name for b in default_buckets(testing.TINY_CONFIG["max_position_embeddings"])]
DTYPES = (torch.float32, torch.bfloat16)
OUT_ARGS = dict(OUT_FORMS.values())  # xllm *_out op -> the names of its output arguments


def all_models(dtypes=DTYPES) -> list[ModelBuckets]:
    """Each architecture's tiny config in ``dtypes``, and the bundled tiny Llama (float32)."""
    return [tiny_config_buckets(a, d) for a in ARCHITECTURES for d in dtypes] + [checkpoint_buckets()]


def assert_quality(where: str, summary: dict) -> None:
    assert set(summary) == SUMMARY_KEYS, where
    arena, lower, naive = summary["arena_bytes"], summary["lower_bound_bytes"], summary["naive_bytes"]
    assert 0 < lower <= arena <= naive, f"{where}: {summary}"
    assert arena <= MAX_RATIO * lower, f"{where}: arena {arena} is {arena / lower:.3f}x the lower bound {lower}"
    assert summary["planned_nodes"] > 0 and summary["unplanned_nodes"] == 0, f"{where}: {summary}"


@pytest.fixture(scope="module")
def tiny_llama_artifact(checkpoints):
    return checkpoints.artifact(TINY_LLAMA, cache_dir="")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- plan quality ---------------------------------------------------------------------------------------------


def test_tiny_llama_report_has_a_memory_section_per_bucket(tiny_llama_artifact):
    report = json.loads((tiny_llama_artifact / "report.json").read_text())
    graphs = read_manifest(tiny_llama_artifact).graph_files()
    names = [name for name in graphs if name != "dynamic"]
    assert names == ["decode_1", "decode_2", "decode_4", "decode_8", *(f"prefill_{t}" for t in (32, 64, 128, 256, 512))]
    assert set(report["memory"]) == set(names)
    for name in names:
        assert_quality(f"tiny-llama {name}", report["memory"][name])
    # Bigger buckets need bigger arenas.
    arenas = [report["memory"][f"prefill_{t}"]["arena_bytes"] for t in (32, 64, 128, 256, 512)]
    assert arenas == sorted(arenas) and arenas[0] < arenas[-1]


def test_tiny_llama_graph_files_carry_the_reported_plan(tiny_llama_artifact):
    report = json.loads((tiny_llama_artifact / "report.json").read_text())
    graphs = read_manifest(tiny_llama_artifact).graph_files()
    fresh = {entry.bucket.name: entry.plan for entry in checkpoint_buckets().buckets}
    for name, summary in report["memory"].items():
        data = json.loads((tiny_llama_artifact / graphs[name]).read_text())
        arena_bytes, buffers = read_memory_plan(data, where=name)
        assert arena_bytes == summary["arena_bytes"] == data["memory_plan"]["arena_bytes"]
        assert {k: data["memory_plan"][k] for k in SUMMARY_KEYS} == summary
        # The artifact's plan is the plan a compile in this process makes (planning is deterministic).
        plan = fresh[name]
        assert plan.summary() == summary
        assert {n: (b.offset, b.shape, b.dtype) for n, b in buffers.items()} == {
            n: (b.offset, b.shape, b.dtype) for n, b in plan.buffers.items()
        }
    assert "memory_plan" not in json.loads((tiny_llama_artifact / graphs["dynamic"]).read_text())


@pytest.mark.parametrize("bucket", TINY_BUCKETS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_tiny_config_plan_quality(architecture, bucket):
    model = tiny_config_buckets(architecture)
    (entry,) = [e for e in model.buckets if e.bucket.name == bucket]
    assert_quality(f"{architecture} {bucket}", entry.plan.summary())


def test_arena_is_the_aligned_peak_of_live_bytes():
    """Measured against the peak of *aligned* live bytes (what any 64-byte-aligned plan needs), the greedy
    plan is within 5% on every bucket, 16-bit ones included, and never more than the naive sum."""
    for model in all_models():
        for entry in model.buckets:
            plan, where = entry.plan, f"{model.name} {entry.bucket.name}"
            sizes = {name: aligned(nbytes(b.shape, b.dtype)) for name, b in plan.buffers.items()}
            peak = peak_live_bytes([(sizes[name], *plan.lifetimes[name]) for name in plan.buffers])
            assert peak <= plan.arena_bytes <= MAX_RATIO * peak, f"{where}: arena {plan.arena_bytes}, peak {peak}"
            assert plan.naive_bytes == sum(sizes.values()), where
            assert plan.lower_bound_bytes <= peak, where
            assert plan.planned_nodes > 0 and plan.unplanned_nodes == 0, where


@pytest.fixture(scope="module")
def llama_100m(tmp_path_factory):
    """(checkpoint, artifact) of a full-width llama-100m cut to 2 layers, compiled with default options."""
    from tools.random_checkpoint import write_checkpoint

    root = tmp_path_factory.mktemp("llama-100m")
    checkpoint = write_checkpoint(root / "checkpoint", "llama-100m", num_hidden_layers=2)
    xllm_compiler.compile(checkpoint, root / "artifact", cache_dir="")
    yield checkpoint, root / "artifact"
    shutil.rmtree(root, ignore_errors=True)


def test_llama_100m_plan_quality_on_every_bucket(llama_100m):
    _, artifact = llama_100m
    report = json.loads((artifact / "report.json").read_text())
    graphs = read_manifest(artifact).graph_files()
    assert report["model"]["parameters"] > 60_000_000  # full width: the 32k x 768 embedding and LM head
    names = [name for name in graphs if name != "dynamic"]
    assert names == ["decode_1", "decode_2", "decode_4", "decode_8", *(f"prefill_{t}" for t in (32, 64, 128, 256, 512))]
    assert set(report["memory"]) == set(names)
    ratios = {}
    for name in names:
        summary = report["memory"][name]
        assert_quality(f"llama-100m {name}", summary)
        ratios[name] = round(summary["arena_bytes"] / summary["lower_bound_bytes"], 4)
    print("llama-100m arena / lower bound:", ratios)


def test_llama_100m_plans_never_overlap(llama_100m):
    """The same plans, made in process (where lifetimes are known): no two live buffers share a byte."""
    checkpoint, artifact = llama_100m
    graphs = read_manifest(artifact).graph_files()
    model = checkpoint_buckets(checkpoint, keep=False)
    assert [e.bucket.name for e in model.buckets] == [name for name in graphs if name != "dynamic"]
    for entry in model.buckets:
        assert_no_overlap(f"llama-100m {entry.bucket.name}", entry.plan)
        data = json.loads((artifact / graphs[entry.bucket.name]).read_text())
        arena_bytes, buffers = read_memory_plan(data, where=entry.bucket.name)
        assert arena_bytes == entry.plan.arena_bytes
        assert {n: (b.offset, b.shape, b.dtype) for n, b in buffers.items()} == {
            n: (b.offset, b.shape, b.dtype) for n, b in entry.plan.buffers.items()
        }


# -- no two live buffers overlap ----------------------------------------------------------------------------------


def assert_no_overlap(where: str, plan: MemoryPlan) -> None:
    assert set(plan.buffers) == set(plan.lifetimes), where
    spans = []
    for name, buffer in plan.buffers.items():
        assert name.startswith(ARENA_PREFIX), f"{where}: {name}"
        size = nbytes(buffer.shape, buffer.dtype)
        first, last = plan.lifetimes[name]
        assert size > 0 and first <= last, f"{where}: {name}"
        assert buffer.offset >= 0 and buffer.offset % ALIGNMENT == 0, f"{where}: {name} at {buffer.offset}"
        assert buffer.offset + size <= plan.arena_bytes, f"{where}: {name} ends past the arena"
        spans.append((name, buffer.offset, buffer.offset + size, first, last))
    for i, (a, a_begin, a_end, a_first, a_last) in enumerate(spans):
        for b, b_begin, b_end, b_first, b_last in spans[i + 1 :]:
            if a_first <= b_last and b_first <= a_last:  # alive at once
                assert a_end <= b_begin or b_end <= a_begin, (
                    f"{where}: {a} [{a_begin}, {a_end}) and {b} [{b_begin}, {b_end}) overlap, both alive at "
                    f"node {max(a_first, b_first)}"
                )


def test_buffers_alive_at_once_never_share_a_byte():
    for model in all_models():
        for entry in model.buckets:
            assert entry.plan.buffers, f"{model.name} {entry.bucket.name}"
            assert_no_overlap(f"{model.name} {entry.bucket.name}", entry.plan)


def test_lifetimes_of_the_plan_are_those_of_liveness():
    for model in all_models((torch.float32,)):
        for entry in model.buckets:
            liveness = Liveness(entry.specialised)
            spans = sorted((s.start, s.end, s.nbytes) for s in liveness.planned())
            plan = entry.plan
            assert sorted((*plan.lifetimes[n], nbytes(b.shape, b.dtype)) for n, b in plan.buffers.items()) == spans
            assert plan.lower_bound_bytes == liveness.lower_bound(liveness.planned(), ALIGNMENT)


storages_strategy = st.lists(
    st.tuples(st.integers(1, 5000), st.integers(0, 40), st.integers(0, 15)), min_size=0, max_size=40
)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(storages_strategy)
def test_greedy_by_size_on_random_lifetimes(specs):
    storages = [
        Storage((f"s{i}", 0), size, torch.uint8, (size,), start, start + length)
        for i, (size, start, length) in enumerate(specs)
    ]
    offsets, arena = greedy_by_size(storages)
    assert set(offsets) == {s.key for s in storages}
    plan = MemoryPlan(arena, 0, 0, len(storages), 0)
    for s in storages:
        plan.buffers[ARENA_PREFIX + s.key[0]] = Buffer(offsets[s.key], s.shape, s.dtype)
        plan.lifetimes[ARENA_PREFIX + s.key[0]] = (s.start, s.end)
    assert_no_overlap("random", plan)
    assert peak_live_bytes([(aligned(s.nbytes), s.start, s.end) for s in storages]) <= arena
    assert arena <= sum(aligned(s.nbytes) for s in storages)


# -- rewrites -------------------------------------------------------------------------------------------------


def arena_target(value) -> str | None:
    if isinstance(value, fx.Node) and value.op == "get_attr" and value.target.startswith(ARENA_PREFIX):
        return value.target
    return None


def writes(node: fx.Node) -> list[str]:
    """The arena buffers ``node`` writes: its out= keyword, or the output arguments (by name) of an xllm *_out op."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return []
    if node.target.namespace == "aten":
        return [t] if (t := arena_target(node.kwargs.get("out"))) else []
    if node.target.name() in OUT_ARGS:
        names = [a.name for a in node.target._schema.arguments]
        arguments = {**dict(zip(names, node.args, strict=False)), **node.kwargs}
        return [arena_target(arguments.get(out)) for out in OUT_ARGS[node.target.name()]]
    return []


def test_planned_ops_write_into_their_arena_buffers():
    for model in all_models():
        for entry in model.buckets:
            where, plan, planned = f"{model.name} {entry.bucket.name}", entry.plan, entry.planned
            before = {n.name: n for n in entry.specialised.graph.nodes}
            planned_names = {s.key[0].name for s in Liveness(entry.specialised).planned()}
            writers: dict[str, list[str]] = {}
            for node in planned.graph.nodes:
                for target in writes(node):
                    assert target is not None, f"{where}: {node.format_node()} writes outside the arena"
                    writers.setdefault(target, []).append(node.name)
            # Every buffer is written by exactly one node, and that node is the one whose value it holds.
            assert set(writers) == set(plan.buffers), where
            assert all(len(nodes) == 1 for nodes in writers.values()), where
            assert {name: nodes[0] for name, nodes in writers.items()} == {
                name: re.sub(r"_out\d+$", "", name.removeprefix(ARENA_PREFIX)) for name in plan.buffers
            }
            assert planned_names == {nodes[0] for nodes in writers.values()}
            assert len(planned_names) == plan.planned_nodes
            for name in planned_names:
                old, new = before[name].target, next(n for n in planned.graph.nodes if n.name == name).target
                if old.namespace == "aten":
                    # ATen's out= overload of the same op.
                    assert new._schema.name == old._schema.name and new._overloadname.endswith("out"), where
                    assert [a.name for a in new._schema.arguments][-1] == "out"
                else:
                    assert new.name() == OUT_FORMS[old.name()][0], where
            # No xllm op that has an out form is left allocating, and none of the *_out forms is read through
            # getitem (they return nothing: their users read the buffers).
            after = Counter(n.target for n in planned.graph.nodes if n.op == "call_function")
            ops = Counter(n.target for n in entry.specialised.graph.nodes if n.op == "call_function")
            for op, (out_name, _) in OUT_FORMS.items():
                base = getattr(torch.ops.xllm, op.split("::")[1]).default
                out = getattr(torch.ops.xllm, out_name.split("::")[1]).default
                assert after[base] == 0 and after[out] == ops[base], f"{where}: {op}"
            for node in planned.graph.nodes:
                is_op = node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
                if is_op and node.target.name() in OUT_ARGS:
                    assert not node.users, f"{where}: {node.name} is read"
            # The buffers' stand-ins on the graph module have the plan's shapes and dtypes, on the meta device.
            holder = planned.get_submodule(ARENA_PREFIX.rstrip("."))
            for name, buffer in plan.buffers.items():
                stand_in = getattr(holder, name.removeprefix(ARENA_PREFIX))
                assert (tuple(stand_in.shape), stand_in.dtype, stand_in.device.type) == (
                    buffer.shape,
                    buffer.dtype,
                    "meta",
                )


WEIGHT = torch.randn(8, 8)


def escaping(x):
    y = torch.mm(x, WEIGHT)
    a, b = y.split(4, dim=-1)
    c = a * 2
    normed, summed = torch.ops.xllm.fused_add_rms_norm(c, c, torch.ones(4), 1e-6)
    values, indices = torch.max(b.t() + 1, dim=0)
    y.add_(1.0)
    return y.view(-1).sum() + normed.sum() + summed.sum() + values.sum() + indices.sum(), c


def test_ops_without_an_out_form_keep_allocating_and_are_counted():
    gm = make_fx(escaping, tracing_mode="fake", _allow_non_fake_inputs=True)(torch.randn(4, 8))
    reference = make_fx(escaping, tracing_mode="fake", _allow_non_fake_inputs=True)(torch.randn(4, 8))
    result = plan_memory(gm)
    gm.recompile()
    plan = gm.meta["memory_plan"]
    assert result.matches == plan.planned_nodes > 0
    # torch.ones (no out= overload with the same arguments) and max.dim (two outputs) keep allocating.
    kept = [n for n in gm.graph.nodes if n.target in (torch.ops.aten.ones.default, torch.ops.aten.max.dim)]
    assert len(kept) == 2 and plan.unplanned_nodes == 2
    # c reaches the output: its mul is not planned either, but that is a pin, not an unplanned op.
    (mul,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor]
    assert "out" not in mul.kwargs
    assert_no_overlap("hand graph", plan)
    runnable_gm, _ = runnable(gm)
    x = torch.randn(4, 8)
    for got, expected in zip(runnable_gm(x.clone()), reference(x.clone()), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


# -- the planned graph computes what the unplanned one did --------------------------------------------------------


def step_for(bucket, model: ModelBuckets, vocab: int, seed: int):
    """Inputs of one step filling ``bucket`` (mixed lengths, padding tokens and sequences), with the KV blocks
    they use: fresh prompts for a prefill bucket, one new token after a cached context for a decode one."""
    rng = random.Random(seed)
    if bucket.phase == "prefill":
        count = min(bucket.num_seqs, 3)
        lengths = [rng.randint(1, (bucket.num_tokens - 3) // count) for _ in range(count)]
        work = [(Sequence([rng.randrange(vocab) for _ in range(n)], n), n) for n in lengths]
    else:
        count = bucket.num_seqs if bucket.num_seqs <= 2 else bucket.num_seqs - 1  # some padding sequences
        work = []
        for _ in range(count):
            context = rng.randint(1, min(model.max_seq_len - 2, 150))
            tokens = [rng.randrange(vocab) for _ in range(context + 1)]
            work.append((Sequence(tokens, context + 1, num_computed=context), 1))
    block = 1
    for seq, n in work:
        used = -(-(seq.num_computed + n) // model.block_size)
        seq.blocks = list(range(block, block + used))
        block += used
    max_blocks = -(-model.max_seq_len // model.block_size)
    inputs = build_step_inputs(
        work, bucket.num_tokens, bucket.num_seqs, model.block_size, max_blocks, torch.device("cpu")
    )
    return inputs, block


def random_caches(gm: fx.GraphModule, num_blocks: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    caches = []
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name.startswith("kv_cache_"):
            _, _, block_size, heads, dim = node.meta["val"].shape
            shape = (2, num_blocks, int(block_size), int(heads), int(dim))
            caches.append(torch.randn(shape, generator=generator).to(node.meta["val"].dtype))
    return caches


def test_tiny_config_weights_are_initialised():
    """The graphs check_pass and these tests run must have real random weights. Deterministic mode makes
    torch.empty fill with NaN, so an uninitialised weight shows every time."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        gm = original_build_graph(testing.tiny_config("LlamaForCausalLM"))
    finally:
        torch.use_deterministic_algorithms(previous)
    bad = [name for name, tensor in gm.named_buffers() if tensor.is_floating_point() and not tensor.isfinite().all()]
    assert not bad, f"uninitialised weights: {bad}"


def test_planned_graphs_compute_what_unplanned_ones_did():
    for model in all_models():
        embedding = next(n for n in model.graph.graph.nodes if n.target == torch.ops.aten.embedding.default)
        vocab, _ = embedding.args[0].meta["val"].shape
        dtype = embedding.meta["val"].dtype
        for seed, entry in enumerate(model.buckets):
            where = f"{model.name} {entry.bucket.name}"
            inputs, num_blocks = step_for(entry.bucket, model, vocab, seed)
            caches = random_caches(model.graph, num_blocks, seed)
            args = [inputs[s.name] for s in STEP_INPUTS]
            planned, arena = runnable(entry.planned)  # arena bytes start as NaN: a read before a write shows
            expected_caches, got_caches = [c.clone() for c in caches], [c.clone() for c in caches]
            with torch.inference_mode():
                expected = entry.specialised(*args, *expected_caches)[0].float()
                got = planned(*args, *got_caches)[0].float()
                again = planned(*args, *[c.clone() for c in caches])[0].float()  # over the first call's leftovers
            assert torch.isfinite(got).all(), where
            tolerance = 1e-5 if dtype == torch.float32 else TOLERANCE[dtype]
            scale = expected.abs().max()
            assert ((got - expected).abs().max() / scale).item() <= tolerance, where
            assert torch.equal(again, got), where
            for got_cache, expected_cache in zip(got_caches, expected_caches, strict=True):
                torch.testing.assert_close(got_cache, expected_cache, rtol=0, atol=0)
            assert (arena != 0xFF).any(), where


# -- the runtime: a planned artifact answers as an unplanned one --------------------------------------------------


@pytest.fixture(scope="module")
def unplanned_artifact(checkpoints):
    return checkpoints.artifact(TINY_LLAMA, cache_dir="", disable_passes=["plan_memory"])


def test_unplanned_artifact_has_no_plan(unplanned_artifact):
    report = json.loads((unplanned_artifact / "report.json").read_text())
    graphs = read_manifest(unplanned_artifact).graph_files()
    assert report["memory"] == {}
    for rel in graphs.values():
        assert "memory_plan" not in json.loads((unplanned_artifact / rel).read_text())
    model = xllm_compiler.load(unplanned_artifact)
    assert model.memory_stats()["arena_bytes"] == 0 and model.memory_stats()["arena_bytes_per_bucket"] == {}


def one_step_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    """Last-position logits of ``prompts`` prefilled in one step, whatever the buckets hold."""
    scheduler = model.make_scheduler(max_num_batched_tokens=sum(map(len, prompts)), enable_prefix_caching=False)
    params = SamplingParams(max_new_tokens=0, return_logits=True)
    outputs = scheduler.run(Request(str(i), p, params) for i, p in enumerate(prompts))
    return torch.stack([outputs[str(i)][-1].logits for i in range(len(prompts))])


def test_planned_and_unplanned_artifacts_agree(tiny_llama_artifact, unplanned_artifact):
    planned, unplanned = xllm_compiler.load(tiny_llama_artifact), xllm_compiler.load(unplanned_artifact)
    assert planned.memory_stats()["arena_bytes"] > 0
    prompts = mixed_prompts(planned.vocab_size, lengths=(5, 1, 23, 40, 100, 7, 64), seed=5)
    longer_than_every_bucket = mixed_prompts(planned.vocab_size, lengths=(600,), seed=6)  # prefilled in chunks
    for batch in (prompts, prompts[:1], prompts[2:5], [prompts[1], prompts[4]], longer_than_every_bucket):
        expected, got = unplanned.logits(batch), planned.logits(batch)
        assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5
        expected_tokens = unplanned.generate(batch, max_new_tokens=16, ignore_eos=True)
        assert planned.generate(batch, max_new_tokens=16, ignore_eos=True) == expected_tokens
    # In one step, past every prefill bucket: the dynamic graph.
    expected, got = (
        one_step_logits(unplanned, longer_than_every_bucket),
        one_step_logits(planned, longer_than_every_bucket),
    )
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5
    # Every decode bucket graph ran on the arena, and the unplanned fallback graph between them.
    assert {"decode_1", "decode_2", "decode_4", "decode_8", "dynamic"} <= set(planned.engine.graphs.resident())
    assert planned.stats()["fallbacks"] > 0
