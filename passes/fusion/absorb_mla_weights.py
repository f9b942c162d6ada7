"""Absorb MLA's kv_b_proj into the query and the output, so that decode attends over the latent cache itself.

Before:  o = xllm.mla_attention(q_nope, q_pe, latent, k_pe, cache, *metadata, W, scale)       # [T, H, v]
After:   W3 = W.view(H, nope + v, kv_lora);  W_k = W3[:, :nope];  W_v = W3[:, nope:]   (views: no copy)
         q = cat(bmm(q_nope^T, W_k)^T, q_pe)                                  # [T, H, kv_lora + rope]
         a = xllm.latent_attention(q, cat(latent, k_pe), cache, *metadata, scale, kv_lora)  # [T, H, kv_lora]
         o = bmm(a^T, W_v^T)^T                                                 # [T, H, v]
Why: scores are q_nope . (W_k c) + q_pe . k_pe = (q_nope W_k) . c + q_pe . k_pe, and the output
sum_j p_j W_v c_j = W_v (sum_j p_j c_j), so keys and values need never be expanded from the cached latents
c. The unabsorbed form expands every context position through W on every step (H * (nope + v) * kv_lora
multiply-adds per position, the cost transformers pays per decode step); the absorbed one multiplies
only the new rows by W_k and W_v and attends over the C-wide cached rows, one multi-query attention.
Where: buckets with at most MAX_ROWS_PER_SEQUENCE query rows per sequence entry (decode, verify). A
prefill chunk shares one expansion among all its queries, while its absorbed attention would run over
rows kv_lora + rope wide instead of nope + rope for the scores and kv_lora instead of v for the output
(tools/bench.py --preset deepseek measures both). The fallback graph is never specialised, so it keeps
the unabsorbed form.
Exact in real arithmetic; in floating point it reassociates the matmuls (the pass's tests bound it).
"""

from __future__ import annotations

import contextlib

import torch
from torch import fx
from torch._guards import detect_fake_mode

from xllm_compiler.interface import NUM_SEQS, NUM_TOKENS
from xllm_compiler.passes.bucket_sizes import bucket_substitutions, concrete
from xllm_compiler.passes.graph_pass import PassResult, graph_pass

aten, xllm = torch.ops.aten, torch.ops.xllm

#: Query rows per sequence entry at most for a bucket to attend absorbed: decode and verify have one.
MAX_ROWS_PER_SEQUENCE = 1


def _absorbs(gm: fx.GraphModule) -> bool:
    sizes = gm.meta.get("sizes", {})
    return NUM_TOKENS in sizes and sizes[NUM_TOKENS] <= MAX_ROWS_PER_SEQUENCE * sizes[NUM_SEQS]


class _Builder:
    """Inserts nodes before ``anchor``, each carrying the fake value its op computes."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, fake_mode):
        self.graph, self.anchor, self.fake_mode = graph, anchor, fake_mode

    def __call__(self, target, *args) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args)
        values = fx.node.map_arg(args, lambda n: n.meta["val"])
        with self.fake_mode if self.fake_mode is not None else contextlib.nullcontext(), torch.no_grad():
            node.meta["val"] = target(*values)
        return node


def _absorb(gm: fx.GraphModule, node: fx.Node, fake_mode) -> None:
    q_nope, q_pe, latent, k_pe, cache, slots, query_lens, seq_lens, tables, weight, scale = node.args[:11]
    subs = bucket_substitutions(gm)
    num_heads, nope = (concrete(s, subs) for s in q_nope.meta["val"].shape[1:])
    width, kv_lora = (concrete(s, subs) for s in weight.meta["val"].shape)
    value_dim = width // num_heads - nope
    build = _Builder(gm.graph, node, fake_mode)
    per_head = build(aten.view.default, weight, [num_heads, nope + value_dim, kv_lora])
    w_k = build(aten.slice.Tensor, per_head, 1, 0, nope)  # [H, nope, kv_lora]
    w_v = build(aten.slice.Tensor, per_head, 1, nope, nope + value_dim)  # [H, v, kv_lora]
    q_latent = build(aten.bmm.default, build(aten.transpose.int, q_nope, 0, 1), w_k)  # [H, T, kv_lora]
    query = build(aten.cat.default, [build(aten.transpose.int, q_latent, 0, 1), q_pe], -1)
    rows = build(aten.cat.default, [build(aten.unsqueeze.default, latent, 1), k_pe], -1)  # [T, 1, C]
    metadata = (slots, query_lens, seq_lens, tables)
    attended = build(xllm.latent_attention.default, query, rows, cache, *metadata, scale, kv_lora)
    out = build(aten.bmm.default, build(aten.transpose.int, attended, 0, 1), build(aten.transpose.int, w_v, 1, 2))
    out = build(aten.clone.default, build(aten.transpose.int, out, 0, 1))  # [T, H, v], rows dense for o_proj
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


@graph_pass("absorb_mla_weights", version=1)
def absorb_mla_weights(gm: fx.GraphModule) -> PassResult:
    """Rewrite every ``xllm::mla_attention`` of a decode-shaped bucket graph into latent attention."""
    if not _absorbs(gm):
        return PassResult(changed=False)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == xllm.mla_attention.default]
    if not nodes:
        return PassResult(changed=False)
    fake_mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if "val" in n.meta])
    for node in nodes:
        _absorb(gm, node, fake_mode)
    return PassResult(changed=True, matches=len(nodes))
