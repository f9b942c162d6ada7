"""Guards: what torch.export assumed about the step dims is re-checked for every bucket at compile time.

A bucket that breaks a guard (a model's divisibility or bound check, or export's own assumptions) is refused
with an OptionsError naming the bucket and the guard in dim names; a bucket that satisfies them gives a graph
with every size folded to a constant: no sym_size or _assert_scalar nodes, and int shapes in its metadata.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from xllm_compiler.artifact.graph_format import serialize_graph
from xllm_compiler.buckets import DECODE, PREFILL, Bucket, make_buckets
from xllm_compiler.buckets.specialize import specialize
from xllm_compiler.capture.export import capture
from xllm_compiler.errors import OptionsError
from xllm_compiler.interface import NUM_SEQS, NUM_TOKENS, STEP_INPUTS, InputSpec
from xllm_compiler.options import DEFAULT_DECODE_BUCKETS, DEFAULT_PREFILL_BUCKETS
from xllm_compiler.passes.verify import relative_error, run_steps, sample_steps
from xllm_compiler.testing import build_graph, tiny_config

INPUTS = [InputSpec("input_ids", torch.int64, (NUM_TOKENS,))]
SYMBOLIC_OPS = (torch.ops.aten.sym_size.int, torch.ops.aten._assert_scalar.default)

EVEN = "Eq(Mod(num_tokens, 2), 0)"
AT_MOST_64 = "num_tokens <= 64"
#: export's own assumption about a dim it traced with open bounds (a model that narrows a range is re-traced so).
AT_LEAST_2 = "num_tokens >= 2"


class Even(torch.nn.Module):
    def forward(self, input_ids, kv_caches):
        torch._check(input_ids.shape[0] % 2 == 0)
        return (input_ids * 2).view(-1, 2)


class AtMost64(torch.nn.Module):
    def forward(self, input_ids, kv_caches):
        torch._check(input_ids.shape[0] <= 64)
        return (input_ids * 2).view(-1, 2)


class EvenAndAtMost64(torch.nn.Module):
    def forward(self, input_ids, kv_caches):
        torch._check(input_ids.shape[0] % 2 == 0)
        torch._check(input_ids.shape[0] <= 64)
        return (input_ids * 2).view(-1, 2)


MODULES = {"even": Even, "at_most_64": AtMost64, "even_and_at_most_64": EvenAndAtMost64}
_GRAPHS: dict[str, torch.fx.GraphModule] = {}


def graph_of(name: str) -> torch.fx.GraphModule:
    """The captured graph of MODULES[name], traced once per session (specialize copies it, never edits it)."""
    if name not in _GRAPHS:
        _GRAPHS[name] = capture(MODULES[name](), INPUTS, [])
    return _GRAPHS[name]


def symbolic_nodes(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in SYMBOLIC_OPS]


def meta_shapes(serialized: dict) -> list:
    """Every size in the serialised graph's node metadata (tensor shapes and int values)."""
    sizes = []

    def visit(meta):
        if isinstance(meta, list):
            for m in meta:
                visit(m)
        elif isinstance(meta, dict):
            sizes.extend(meta.get("shape", []))
            if "int" in meta:
                sizes.append(meta["int"])

    for node in serialized["nodes"]:
        visit(node.get("meta"))
    return sizes


@pytest.mark.parametrize(
    ("module", "num_tokens", "guard"),
    [
        ("even", 1, EVEN),
        ("even", 3, EVEN),
        ("at_most_64", 128, AT_MOST_64),
        ("at_most_64", 66, AT_MOST_64),
        ("at_most_64", 1, AT_LEAST_2),
        ("even_and_at_most_64", 1, AT_LEAST_2),
        ("even_and_at_most_64", 3, EVEN),
        ("even_and_at_most_64", 128, AT_MOST_64),
    ],
)
def test_bucket_violating_a_guard_is_refused_naming_bucket_and_guard(module, num_tokens, guard):
    gm = graph_of(module)
    with pytest.raises(OptionsError) as raised:
        specialize(gm, Bucket(PREFILL, num_tokens, 1))
    message = str(raised.value)
    assert f"prefill_{num_tokens}" in message
    assert f"num_tokens={num_tokens}" in message
    assert guard in message
    assert re.search(r"\bs\d+\b", message) is None, message  # dim names, never export's symbols (s72)


@pytest.mark.parametrize("module", sorted(MODULES))
@pytest.mark.parametrize("num_tokens", [4, 6, 64])
def test_bucket_satisfying_the_guards_is_fully_specialised(module, num_tokens):
    gm = graph_of(module)
    assert symbolic_nodes(gm), "the dynamic graph should still hold its size checks"
    specialised = specialize(gm, Bucket(PREFILL, num_tokens, 1))

    assert symbolic_nodes(specialised) == []
    specialised.graph.lint()
    sizes = meta_shapes(serialize_graph(specialised))
    assert sizes and all(isinstance(s, int) for s in sizes), sizes
    assert specialised.meta["sizes"] == {NUM_TOKENS: num_tokens, NUM_SEQS: 1}

    ids = torch.arange(num_tokens)
    (result,) = specialised(ids)
    assert torch.equal(result, (ids * 2).view(-1, 2))
    # The dynamic graph is untouched by specialising it.
    assert symbolic_nodes(gm)
    assert "sizes" not in gm.meta


def test_dynamic_graph_keeps_its_runtime_checks():
    """The fallback graph, run at a size no bucket was checked for, still enforces the model's check."""
    gm = graph_of("even")
    (result,) = gm(torch.arange(10))
    assert result.shape == (5, 2)
    with pytest.raises(RuntimeError):
        gm(torch.arange(7))


# -- the real decoder graph ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder_graph():
    return build_graph(tiny_config("LlamaForCausalLM", num_hidden_layers=1))


def test_decoder_graph_specialises_for_every_default_bucket(decoder_graph):
    gm = decoder_graph
    buckets = make_buckets(DEFAULT_DECODE_BUCKETS, DEFAULT_PREFILL_BUCKETS, max(DEFAULT_PREFILL_BUCKETS), False)
    assert Bucket(DECODE, 1, 1) in buckets
    assert len(buckets) == len(DEFAULT_DECODE_BUCKETS) + len(DEFAULT_PREFILL_BUCKETS)
    for bucket in buckets:
        specialised = specialize(gm, bucket)
        assert symbolic_nodes(specialised) == [], bucket
        specialised.graph.lint()
        serialized = serialize_graph(specialised)
        # num_tokens and num_seqs are constants now; only the KV pool's and block table's dims stay open.
        text = json.dumps([n.get("meta") for n in serialized["nodes"]])
        assert NUM_TOKENS not in text and NUM_SEQS not in text, bucket
        placeholders = {n["name"]: n["meta"]["shape"] for n in serialized["nodes"] if n["op"] == "placeholder"}
        assert placeholders["input_ids"] == [bucket.num_tokens]
        assert placeholders["logits_indices"] == [bucket.num_seqs]
        assert placeholders["block_tables"] == [bucket.num_seqs, "max_blocks_per_seq"]


def test_specialised_decoder_graph_computes_what_the_dynamic_graph_does(decoder_graph):
    """sample_steps' decode step is 2 sequences of one token each: exactly decode_2."""
    gm = decoder_graph
    gm.recompile()
    steps, caches = sample_steps(gm)
    decode = steps[1]
    assert decode["input_ids"].shape == (2,)
    # The prefill writes the cache the decode step reads: run it on the dynamic graph first.
    caches = [c.clone() for c in caches]
    with torch.inference_mode():
        gm(*(steps[0][s.name] for s in STEP_INPUTS), *caches)
    reference = run_steps(gm, [decode], caches)
    specialised = specialize(gm, Bucket(DECODE, 2, 2))
    assert relative_error(run_steps(specialised, [decode], caches), reference) <= 1e-6


# -- make_buckets ------------------------------------------------------------------------------------------------


def test_explicit_prefill_bucket_above_max_seq_len_is_refused():
    with pytest.raises(OptionsError, match=r"prefill bucket 128 exceeds max_seq_len 64"):
        make_buckets((1, 2), (16, 128), max_seq_len=64, explicit_prefill=True)
    with pytest.raises(OptionsError, match=r"prefill bucket 65 "):
        make_buckets((1,), (65,), max_seq_len=64, explicit_prefill=True)
    # A bucket of exactly max_seq_len is fine.
    assert make_buckets((1,), (64,), max_seq_len=64, explicit_prefill=True)[-1] == Bucket(PREFILL, 64, 1)


def test_default_prefill_buckets_above_max_seq_len_are_dropped():
    buckets = make_buckets(DEFAULT_DECODE_BUCKETS, DEFAULT_PREFILL_BUCKETS, max_seq_len=100, explicit_prefill=False)
    assert [b.num_tokens for b in buckets if b.phase == PREFILL] == [32, 64]
    assert [b.num_tokens for b in buckets if b.phase == DECODE] == list(DEFAULT_DECODE_BUCKETS)
    # Nothing left: one bucket of max_seq_len, taking at most as many prompts as the largest decode bucket.
    only = make_buckets((1, 2, 4), (32, 64), max_seq_len=20, explicit_prefill=False)
    assert [b for b in only if b.phase == PREFILL] == [Bucket(PREFILL, 20, 4)]
