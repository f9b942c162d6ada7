"""Split a step's tokens into two micro-batches and interleave them, so that one half's all-reduce is
in flight while the other half computes (xLLM's dual-stream idea, as a graph pass).

A bucket graph (every size known) of at least ``min_tokens`` tokens that holds collectives is rebuilt:
every token-wise value (one row per token: embeddings, norms, projections, rotary, attention output,
all-reduces) gets an A copy for tokens [0, h) and a B copy for [h, T). The schedule goes segment by
segment, a segment ending at a collective's issue:

    A0 ... issue(A0) | B0 ... issue(B0) | wait(A0) A1 ... issue(A1) | wait(B0) B1 ... issue(B1) | ...

so B's compute runs while A's collective travels and the other way round. Attention keeps the whole
step's metadata and gets each half's token offset; the A half runs first, so a prompt cut in two
sees its first half's keys in its second half. Values that mix rows (the logits row selection) read
both halves concatenated. Row-wise ops only are split: anything else consumes the concatenation.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

from xllm_compiler.interface import NUM_TOKENS
from xllm_compiler.options import DEFAULT_MICRO_BATCH_MIN_TOKENS as DEFAULT_MIN_TOKENS
from xllm_compiler.passes.bucket_sizes import bucket_substitutions, concrete
from xllm_compiler.passes.comm.collectives import ISSUES, WAIT, is_issue
from xllm_compiler.passes.graph_pass import GraphPass, PassResult

aten, xllm = torch.ops.aten, torch.ops.xllm
#: Linear layers on float, int8 or int4 weights.
LINEARS = (aten.linear.default, xllm.linear_w8.default, xllm.linear_w4.default)
#: Ops that compute each output row from the same row of their token-wise inputs.
ROW_WISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default, aten.silu.default,
    aten.rsqrt.default, aten.pow.Tensor_Scalar, aten.to.dtype, aten._to_copy.default, *LINEARS,
    aten.embedding.default, aten.index_select.default, aten.view.default, aten.reshape.default,
    aten.unsqueeze.default, aten.slice.Tensor, aten.split_with_sizes.default, aten.cat.default,
    aten.mean.dim, operator.getitem, xllm.rms_norm.default, xllm.fused_add_rms_norm.default,
    xllm.silu_and_mul.default, xllm.rotary_embedding.default, *ISSUES, WAIT,
    aten.sigmoid.default, xllm.fused_moe.default,  # a token's experts read its own row (and router logits)
    xllm.moe_experts.default, aten.masked_fill.Scalar, aten.eq.Scalar, aten.zeros_like.default,
    aten.expand.default, aten.sum.dim_IntList, aten.topk.default, aten.gather.default, aten.scatter.value,
    aten._softmax.default, aten.softmax.int, aten.max.dim,  # DeepSeek-V2's routing: along each row
}  # fmt: skip
#: Attention ops: how many leading arguments hold the half's rows, and where the token offset goes.
ATTENTION = {
    xllm.paged_attention.default: (3, 10),  # query, key, value
    xllm.mla_attention.default: (4, 11),  # q_nope, q_pe, latent, k_pe
    xllm.latent_attention.default: (2, 9),  # query, latent rows
}
TOKEN_INPUTS = ("input_ids", "positions", "slot_mapping")


@dataclass(frozen=True)
class MicroBatchOptions:
    min_tokens: int = DEFAULT_MIN_TOKENS
    """Steps of fewer tokens run whole: the split costs more than it hides on steps that small."""


def _shape(value: object, subs: dict) -> list[int] | None:
    tensor = value[0] if isinstance(value, (list, tuple)) and value else value
    if not isinstance(tensor, torch.Tensor):
        return None
    return [concrete(size, subs) for size in tensor.shape]


def _row_wise(node: fx.Node, token_wise: set[fx.Node], tokens: int, subs: dict) -> bool:
    """Whether ``node`` computes row i of its output from row i of its token-wise inputs alone."""
    target, args = node.target, node.args
    shape = _shape(node.meta.get("val"), subs)
    if (target not in ROW_WISE and target not in ATTENTION) or not shape or shape[0] != tokens:
        return False
    if target is aten.index_select.default:  # a gather of table rows by a token-wise index
        if args[1] % len(shape) == len(shape) - 1:  # or of each row's values (an act-order layer's inputs)
            return args[0] in token_wise and args[2] not in token_wise
        return args[1] == 0 and args[2] in token_wise and args[0] not in token_wise
    if target is aten.embedding.default:
        return args[1] in token_wise and args[0] not in token_wise
    if target in LINEARS:  # rows of the input times a (float or quantized) weight matrix
        return args[0] in token_wise and not any(a in token_wise for a in args[1:])
    if target in (aten.slice.Tensor, aten.cat.default, aten.split_with_sizes.default):
        dim = args[1] if len(args) > 1 else 0
        if target is aten.cat.default and not all(a in token_wise for a in args[0]):
            return False  # joins a token-wise value with one that is not (e.g. MLA's absorbed query)
        return dim not in (0, -len(shape))
    if target in (aten.mean.dim, aten.sum.dim_IntList):
        return 0 not in [d % len(shape) for d in args[1]]
    if target is aten.topk.default:  # along a row (the default dim is the last)
        return (args[2] if len(args) > 2 else -1) % len(shape) != 0
    if target in (aten._softmax.default, aten.softmax.int, aten.max.dim):  # along the dim given
        return args[1] % len(shape) != 0
    if target in (aten.gather.default, aten.scatter.value):  # within each row, by a token-wise index
        return args[1] % len(shape) != 0 and args[0] in token_wise and args[2] in token_wise
    if target is aten.expand.default:  # broadcasts within each row
        return args[1][0] in (-1, tokens)
    if target in (aten.view.default, aten.reshape.default):
        source = _shape(args[0].meta.get("val"), subs)
        return source is not None and source[0] == tokens and math.prod(source[1:]) == math.prod(shape[1:])
    if target in ATTENTION:  # a half's queries, keys and values (the metadata describes the whole step)
        return all(a in token_wise for a in args[: ATTENTION[target][0]])
    for other in node.all_input_nodes:  # other operands must broadcast along the token dim
        other_shape = _shape(other.meta.get("val"), subs)
        if other not in token_wise and other_shape and len(other_shape) == len(shape) and other_shape[0] != 1:
            return False
    return True


class SplitMicroBatches(GraphPass):
    name = "split_micro_batches"
    version = 5  # 2: MoE blocks split (fused_moe, sigmoid row-wise); attention only over split q, k, v; 3: MLA
    # attention and DeepSeek's routing (topk, gather, scatter within rows; moe_experts); 4: V2's (softmax, max);
    # 5: int8 / int4 linears, and the input gather of act-order int4 layers

    def __init__(self, options: MicroBatchOptions | None = None):
        self.options = options or MicroBatchOptions()

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        tokens = gm.meta.get("sizes", {}).get(NUM_TOKENS)
        if tokens is None or tokens < self.options.min_tokens or not any(is_issue(n) for n in gm.graph.nodes):
            return PassResult(changed=False)
        token_wise = self._token_wise(gm, tokens)
        if token_wise is None:
            return PassResult(changed=False)
        gm.graph = _Splitter(gm.graph, token_wise, tokens, self._subs).build()
        return PassResult(changed=True, matches=1)

    def _token_wise(self, gm: fx.GraphModule, tokens: int) -> set[fx.Node] | None:
        """Values with one row per token, by dataflow from the token inputs through row-wise ops."""
        subs = bucket_substitutions(gm)
        token_wise: set[fx.Node] = set()
        for node in gm.graph.nodes:
            is_input = node.op == "placeholder" and node.name in TOKEN_INPUTS
            if is_input or (
                any(a in token_wise for a in node.all_input_nodes) and _row_wise(node, token_wise, tokens, subs)
            ):
                token_wise.add(node)
        self._subs = subs
        return token_wise if any(n.target in ATTENTION for n in token_wise) else None


class _Splitter:
    """Rebuilds the graph with A/B copies of token-wise nodes, interleaved by segment."""

    def __init__(self, graph: fx.Graph, token_wise: set[fx.Node], tokens: int, subs: dict):
        self.old, self.token_wise, self.tokens, self.subs = graph, token_wise, tokens, subs
        self.half = tokens // 2
        self.new = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.halves: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
        self.joined: dict[fx.Node, fx.Node] = {}

    def build(self) -> fx.Graph:
        segment: list[fx.Node] = []
        for node in self.old.nodes:
            if node.op == "placeholder":
                self.env[node] = self.new.node_copy(node)
                if node in self.token_wise:
                    for part in (0, 1):
                        self._copy(node, part)
                continue
            if node.op == "output":
                self._emit_segment(segment)
                self.new.output(fx.node.map_arg(node.args[0], self._whole))
                break
            segment.append(node)
            if is_issue(node) and node in self.token_wise:
                self._emit_segment(segment)
                segment = []
        return self.new

    def _emit_segment(self, segment: list[fx.Node]) -> None:
        deferred: list[fx.Node] = []
        for part in (0, 1):
            for node in segment:
                if node in self.token_wise:
                    self._copy(node, part)
                elif part == 0:
                    waits = any(a in self.token_wise or a in deferred for a in node.all_input_nodes)
                    if waits:
                        deferred.append(node)  # reads whole token-wise values: after both halves
                    else:
                        self.env[node] = self.new.node_copy(node, lambda n: self.env[n])
        for node in deferred:
            self.env[node] = self.new.node_copy(node, self._whole)

    def _span(self, part: int) -> tuple[int, int]:
        return (0, self.half) if part == 0 else (self.half, self.tokens)

    def _copy(self, node: fx.Node, part: int) -> None:
        start, end = self._span(part)
        if node.op == "placeholder":
            sliced = self.new.call_function(aten.slice.Tensor, (self.env[node], 0, start, end))
            sliced.meta["val"] = _meta_rows(node.meta["val"], end - start, self.subs)
            self._store(node, part, sliced)
            return

        def arg(n: fx.Node) -> fx.Node:
            return self.halves[n][part] if n in self.token_wise else self.env[n]

        copy = self.new.node_copy(node, arg)
        if node.target in ATTENTION:
            offset = ATTENTION[node.target][1]  # token_offset: the metadata describes the whole step
            copy.args = (*copy.args[:offset], start)
        copy.meta["val"] = _meta_rows(node.meta["val"], end - start, self.subs)
        self._store(node, part, copy)

    def _store(self, node: fx.Node, part: int, copy: fx.Node) -> None:
        pair = self.halves.get(node, (None, None))
        self.halves[node] = (copy, pair[1]) if part == 0 else (pair[0], copy)

    def _whole(self, node: fx.Node) -> fx.Node:
        """The full-height value of ``node``: itself, or its halves concatenated (once)."""
        if node not in self.token_wise:
            return self.env[node]
        if node.op == "placeholder":
            return self.env[node]
        if node not in self.joined:
            a, b = self.halves[node]
            joined = self.new.call_function(aten.cat.default, ([a, b], 0))
            joined.meta["val"] = _meta_rows(node.meta["val"], self.tokens, self.subs)
            self.joined[node] = joined
        return self.joined[node]


def _meta_rows(value: object, rows: int, subs: dict) -> object:
    """A meta-device stand-in for ``value`` with ``rows`` rows (shapes are all the planner needs)."""
    if isinstance(value, (list, tuple)):
        return type(value)(_meta_rows(v, rows, subs) for v in value)
    if isinstance(value, torch.Tensor):
        shape = [rows, *(concrete(s, subs) for s in value.shape[1:])]
        return torch.empty(shape, dtype=value.dtype, device="meta")
    return value


split_micro_batches = SplitMicroBatches()
