"""split_micro_batches: a bucket graph's tokens in two halves, interleaved segment by segment, so that
one half's all-reduce is in flight while the other half computes; same results, attention included
(a prompt cut in two sees its first half's keys from its second)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xllm_compiler.interface import NUM_TOKENS, STEP_INPUTS
from xllm_compiler.models.parallel import TRACED_GROUP
from xllm_compiler.ops.collectives import all_reduce
from xllm_compiler.ops.reference import route_grouped_topk
from xllm_compiler.passes.comm.collectives import is_issue, overlap_window, wait_of
from xllm_compiler.passes.comm.split_micro_batches import MicroBatchOptions, SplitMicroBatches
from xllm_compiler.testing import assert_close, check_meta, code, count, run, trace

aten, xllm = torch.ops.aten, torch.ops.xllm
HIDDEN, HEADS, HEAD_DIM, BLOCK_SIZE = 16, 2, 8, 4
PROMPTS = (3, 5)  # one prefill step of 8 tokens: the halves cut the second prompt after its first token
TOKENS = sum(PROMPTS)
WEIGHTS = {
    "embed": torch.randn(32, HIDDEN),
    "q_proj": torch.randn(HEADS * HEAD_DIM, HIDDEN),
    "k_proj": torch.randn(HEAD_DIM, HIDDEN),
    "v_proj": torch.randn(HEAD_DIM, HIDDEN),
    "o_proj": torch.randn(HIDDEN, HEADS * HEAD_DIM),
    "lm_head": torch.randn(32, HIDDEN),
}


def layer(input_ids, positions, slot_mapping, query_lens, seq_lens, block_tables, logits_indices, kv_cache_0):
    """A decoder layer's attention half on one rank: a row-parallel o_proj and its all-reduce."""
    w = WEIGHTS
    x = F.embedding(input_ids, w["embed"])
    q = F.linear(x, w["q_proj"]).view(-1, HEADS, HEAD_DIM)
    k, v = (F.linear(x, w[name]).view(-1, 1, HEAD_DIM) for name in ("k_proj", "v_proj"))
    out = xllm.paged_attention(q, k, v, kv_cache_0, slot_mapping, query_lens, seq_lens, block_tables, 0.35, 0)
    h = x + all_reduce(F.linear(out.view(-1, HEADS * HEAD_DIM), w["o_proj"]), TRACED_GROUP)
    return (F.linear(h.index_select(0, logits_indices), w["lm_head"]),)


def prefill_step() -> tuple[torch.Tensor, ...]:
    """The step's inputs in STEP_INPUTS order, then a zeroed KV cache (sequence s owns blocks 1+2s, 2+2s)."""
    positions = torch.tensor([p for n in PROMPTS for p in range(n)])
    owners = torch.tensor([s for s, n in enumerate(PROMPTS) for _ in range(n)])
    tables = torch.tensor([[1 + 2 * s, 2 + 2 * s] for s in range(len(PROMPTS))], dtype=torch.int32)
    slots = tables[owners, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE
    lengths = torch.tensor(PROMPTS, dtype=torch.int32)
    kv_cache = torch.zeros(2, 1 + 2 * len(PROMPTS), BLOCK_SIZE, 1, HEAD_DIM)
    ids = torch.randint(0, 32, (TOKENS,))
    return ids, positions, slots, lengths, lengths, tables, lengths.cumsum(0) - 1, kv_cache


def bucket_graph(fn=layer):
    """``fn`` as the specialised graph of a bucket of TOKENS tokens (static sizes, meta["sizes"])."""
    gm = trace(fn, *prefill_step(), weights=WEIGHTS, tracing_mode="fake")
    for node, spec in zip(gm.graph.find_nodes(op="placeholder"), STEP_INPUTS, strict=False):
        node.name = node.target = spec.name  # the names capture gives the step inputs (make_fx adds "_1")
    gm.meta["sizes"] = {NUM_TOKENS: TOKENS}
    return gm


SPLIT = SplitMicroBatches(MicroBatchOptions(min_tokens=TOKENS))


def test_splits_the_step_and_overlaps_each_half_with_the_other():
    step = prefill_step()
    gm = bucket_graph()
    expected = run(gm, *step)

    assert SPLIT(gm).matches == 1

    nodes = list(gm.graph.nodes)
    issue_a, issue_b = (n for n in nodes if is_issue(n))
    attention_a, attention_b = (n for n in nodes if n.target is xllm.paged_attention.default)
    assert [a.args[10] for a in (attention_a, attention_b)] == [0, TOKENS // 2], "each half's token offset"
    assert [a.meta["val"].shape[0] for a in (attention_a, attention_b)] == [TOKENS // 2, TOKENS - TOKENS // 2]
    order = nodes.index
    assert order(issue_a) < order(attention_b) < order(issue_b) < order(wait_of(issue_a)), (
        "B's attention and projections run while A's all-reduce is in flight"
    )
    assert overlap_window(issue_a) > 0 and overlap_window(issue_b) > 0
    assert count(gm, aten.index_select.default) == 1, "the logits rows are picked from both halves joined"
    assert_close(run(gm, *step), expected, torch.float32)
    check_meta(gm, *step)


def test_declines_a_step_smaller_than_min_tokens():
    gm = bucket_graph()
    before = code(gm)
    result = SplitMicroBatches(MicroBatchOptions(min_tokens=TOKENS + 1))(gm)
    assert not result and result.matches == 0
    assert code(gm) == before


def test_declines_a_graph_without_collectives():
    def without_all_reduce(input_ids, *rest):
        return (F.embedding(input_ids, WEIGHTS["embed"]).sum(-1),)

    gm = bucket_graph(without_all_reduce)
    before = code(gm)
    assert SPLIT(gm).matches == 0
    assert code(gm) == before


def test_declines_a_graph_that_is_not_specialised():
    gm = bucket_graph()
    del gm.meta["sizes"]
    assert SPLIT(gm).matches == 0


NOPE, ROPE, VALUE, LATENT = 4, 2, 6, 8
MLA_WEIGHTS = {
    "embed": WEIGHTS["embed"],
    "q_proj": torch.randn(HEADS * (NOPE + ROPE), HIDDEN),
    "kv_a": torch.randn(LATENT + ROPE, HIDDEN),
    "kv_b": torch.randn(HEADS * (NOPE + VALUE), LATENT),
    "o_proj": torch.randn(HIDDEN, HEADS * VALUE),
    "router": torch.randn(4, HIDDEN),
    "bias": torch.randn(4),
    "lm_head": WEIGHTS["lm_head"],
}


def mla_layer(input_ids, positions, slot_mapping, query_lens, seq_lens, block_tables, logits_indices, kv_cache_0):
    """DeepSeek's shapes: latent attention (expanded form) and its grouped sigmoid routing on one rank."""
    w = MLA_WEIGHTS
    x = F.embedding(input_ids, w["embed"])
    q_nope, q_pe = F.linear(x, w["q_proj"]).view(-1, HEADS, NOPE + ROPE).split([NOPE, ROPE], dim=-1)
    latent, k_pe = F.linear(x, w["kv_a"]).split([LATENT, ROPE], dim=-1)
    metadata = (slot_mapping, query_lens, seq_lens, block_tables)
    out = xllm.mla_attention(q_nope, q_pe, latent, k_pe.unsqueeze(1), kv_cache_0, *metadata, w["kv_b"], 0.3)
    h = x + all_reduce(F.linear(out.reshape(-1, HEADS * VALUE), w["o_proj"]), TRACED_GROUP)
    weights, ids = route_grouped_topk(F.linear(h, w["router"]), w["bias"], 2, 2, 1, True, 2.5)
    h = h * (weights.sum(-1, keepdim=True) + ids.sum(-1, keepdim=True))
    return (F.linear(h.index_select(0, logits_indices), w["lm_head"]),)


def test_splits_latent_attention_and_grouped_routing():
    """MLA's expanded attention takes each half's token offset (argument 11); DeepSeek's routing (topk,
    scatter and gather within rows) stays per half; the results do not change."""
    step = (*prefill_step()[:-1], torch.zeros(1, 1 + 2 * len(PROMPTS), BLOCK_SIZE, 1, LATENT + ROPE))
    gm = trace(mla_layer, *step, weights=MLA_WEIGHTS, tracing_mode="fake")
    for node, spec in zip(gm.graph.find_nodes(op="placeholder"), STEP_INPUTS, strict=False):
        node.name = node.target = spec.name
    gm.meta["sizes"] = {NUM_TOKENS: TOKENS}
    expected = run(gm, *step)
    assert SPLIT(gm).matches == 1
    attention = [n for n in gm.graph.nodes if n.target is xllm.mla_attention.default]
    assert [a.args[11] for a in attention] == [0, TOKENS // 2]
    assert count(gm, aten.topk.default) == 2 * 3  # the three top-k of the routing, once per half
    assert_close(run(gm, *step), expected, torch.float32)
