"""Liveness: which values share a storage (views, split pieces, in-place writes), which are storages of their
own (each output of a multi-output op), which are pinned (inputs, weights, outputs), the lifetime of each, and
the lower bound: checked on small hand-traced graphs and on every default bucket of the real decoders."""

from __future__ import annotations

import operator
import random

import pytest
import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

import xllm_compiler.ops  # noqa: F401  (registers torch.ops.xllm)
from tests.passes.graphs import ARCHITECTURES
from tests.passes.memory import checkpoint_buckets, peak_live_bytes, tiny_config_buckets
from xllm_compiler.passes.memory.liveness import Liveness, Storage

aten, xllm = torch.ops.aten, torch.ops.xllm
WEIGHT = torch.randn(8, 8)
NORM = torch.ones(4)


def fake_graph(fn, *inputs: torch.Tensor) -> fx.GraphModule:
    """``fn`` traced to ATen with static shapes (every node has a fake ``meta['val']``); tensors it closes
    over become get_attr nodes, like a model's weights."""
    return make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*inputs)


def node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def calls(gm: fx.GraphModule, target) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def storage(liveness: Liveness, value: fx.Node) -> Storage:
    return liveness.storages[liveness.storage_of[(value, 0)]]


def last_reader(liveness: Liveness, nodes: list[fx.Node]) -> int:
    """Index of the last node reading any of ``nodes``."""
    return max(liveness.order[user] for n in nodes for user in n.users)


# -- views, split pieces, in-place writes ----------------------------------------------------------------------


def views(x):
    y = torch.mm(x, WEIGHT)
    v = y.view(-1).unsqueeze(0)
    t = y.t()
    s = y[1:3].transpose(0, 1)
    z = torch.relu(x)
    return (v * 2).sum() + (t + 1).sum() + s.sum() + z.sum()


def test_view_ops_share_their_base_storage_and_extend_its_lifetime():
    gm = fake_graph(views, torch.randn(4, 8))
    liveness = Liveness(gm)
    mm = calls(gm, aten.mm.default)[0]
    aliases = [n for n in gm.graph.nodes if liveness.storage_of.get((n, 0)) == (mm, 0)]
    targets = {n.target for n in aliases}
    assert {aten.view.default, aten.unsqueeze.default, aten.t.default, aten.slice.Tensor, aten.transpose.int} <= targets
    # No view allocates: the only storages are those of ops that compute something.
    allocating = {key[0].target for key in liveness.storages}
    assert not allocating & {aten.view.default, aten.unsqueeze.default, aten.t.default, aten.slice.Tensor}
    mm_storage = liveness.storages[(mm, 0)]
    assert mm_storage.start == liveness.order[mm]
    # mm itself is last read long before its views are: the views keep it alive.
    assert max(liveness.order[u] for u in mm.users) < mm_storage.end == last_reader(liveness, aliases)
    assert mm_storage.nbytes == 4 * 8 * 4 and mm_storage.shape == (4, 8) and mm_storage.dtype == torch.float32


def split_pieces(x, how):
    y = torch.mm(x, WEIGHT)
    if how == "split":
        a, b = y.split(4, dim=-1)
    elif how == "split_with_sizes":
        a, b = y.split([3, 5], dim=-1)
    elif how == "chunk":
        a, b = y.chunk(2, dim=0)
    else:
        a, b, *_ = y.unbind(0)
    c = a * 2  # the first piece is consumed early ...
    d = torch.relu(x).sum()
    return c.sum() + d + b.sum()  # ... the second one last


@pytest.mark.parametrize("how", ["split", "split_with_sizes", "chunk", "unbind"])
def test_split_pieces_share_the_base_storage(how):
    gm = fake_graph(lambda x: split_pieces(x, how), torch.randn(4, 8))
    liveness = Liveness(gm)
    mm = calls(gm, aten.mm.default)[0]
    pieces = [n for n in gm.graph.nodes if n.target is operator.getitem]
    assert len(pieces) >= 2
    assert all(liveness.storage_of[(p, 0)] == (mm, 0) for p in pieces)
    splitter = pieces[0].args[0]
    assert (splitter, 0) not in liveness.storages and (splitter, 1) not in liveness.storages
    # Every piece is a view of mm: the base lives until the last piece is read.
    assert liveness.storages[(mm, 0)].end == last_reader(liveness, pieces)
    assert [key for key in liveness.storages if key[0] is mm] == [(mm, 0)]


def in_place(x):
    y = torch.mm(x, WEIGHT)
    early = y * 3
    y.add_(1.0)
    y.mul_(early)
    return y.sum() * 2


def test_in_place_ops_write_into_their_base_storage():
    gm = fake_graph(in_place, torch.randn(4, 8))
    liveness = Liveness(gm)
    mm = calls(gm, aten.mm.default)[0]
    writes = calls(gm, aten.add_.Tensor) + calls(gm, aten.mul_.Tensor)
    assert len(writes) == 2
    assert all(liveness.storage_of[(w, 0)] == (mm, 0) for w in writes)
    assert not any(key[0] in writes for key in liveness.storages)
    reader = calls(gm, aten.sum.default)[0]
    assert liveness.storages[(mm, 0)].end == liveness.order[reader]


# -- multi-output ops -----------------------------------------------------------------------------------------


def multi_output(x, residual):
    normed, summed = torch.ops.xllm.fused_add_rms_norm(x, residual, NORM, 1e-6)
    values, indices = torch.max(x * 2, dim=-1)
    return normed.sum() + values.sum(), summed.sum() * 2 + indices.sum()


def test_getitems_of_multi_output_ops_are_separate_storages():
    gm = fake_graph(multi_output, torch.randn(6, 4), torch.randn(6, 4))
    liveness = Liveness(gm)
    for op, dtypes in (
        (xllm.fused_add_rms_norm.default, (torch.float32,) * 2),
        (aten.max.dim, (torch.float32, torch.int64)),
    ):
        (call,) = calls(gm, op)
        items = sorted((u for u in call.users if u.target is operator.getitem), key=lambda u: u.args[1])
        assert [liveness.storage_of[(u, 0)] for u in items] == [(call, 0), (call, 1)]
        first, second = liveness.storages[(call, 0)], liveness.storages[(call, 1)]
        assert (first.dtype, second.dtype) == dtypes
        assert first.start == second.start == liveness.order[call]
        for s, item in zip((first, second), items, strict=True):
            assert s.end == last_reader(liveness, [item])
            assert s.nbytes == torch.Size(s.shape).numel() * s.dtype.itemsize
        assert first.name != second.name and second.name.endswith("_out1")
    # The two outputs of the fused norm are read at different times: their lifetimes differ.
    (norm,) = calls(gm, xllm.fused_add_rms_norm.default)
    assert liveness.storages[(norm, 0)].end != liveness.storages[(norm, 1)].end


# -- pinned storages ------------------------------------------------------------------------------------------


def escaping(x):
    y = torch.mm(x, WEIGHT)
    hidden = torch.relu(y)
    a, b = torch.mm(hidden, WEIGHT).split(4, dim=-1)
    return hidden.view(-1), b * 2, a.sum()


def test_inputs_weights_and_outputs_are_pinned_not_planned():
    gm = fake_graph(escaping, torch.randn(4, 8))
    liveness = Liveness(gm)
    placeholders = [n for n in gm.graph.nodes if n.op in ("placeholder", "get_attr")]
    assert len(placeholders) >= 2
    assert all((n, 0) in liveness.pinned and (n, 0) not in liveness.storages for n in placeholders)
    relu = calls(gm, aten.relu.default)[0]
    mm_first, mm_second = calls(gm, aten.mm.default)
    mul = calls(gm, aten.mul.Tensor)[0]
    # relu reaches the output through a view; mul directly; the final sum directly.
    outputs = {liveness.storage_of[(arg, 0)] for arg in next(iter(reversed(gm.graph.nodes))).all_input_nodes}
    assert (relu, 0) in outputs and (mul, 0) in outputs
    planned = {s.key for s in liveness.planned()}
    assert {(relu, 0), (mul, 0)} <= liveness.pinned
    assert not planned & liveness.pinned
    # Intermediates that die inside the graph are planned, split bases included.
    assert {(mm_first, 0), (mm_second, 0)} <= planned
    assert all(key[0].op == "call_function" for key in liveness.storages)


def test_storages_of_size_zero_are_not_planned():
    gm = fake_graph(lambda x: (torch.mm(x[:0], WEIGHT) + 1).sum() + torch.relu(x).sum(), torch.randn(4, 8))
    liveness = Liveness(gm)
    empty = [s for s in liveness.storages.values() if s.nbytes == 0]
    assert empty and not {s.key for s in empty} & {s.key for s in liveness.planned()}


# -- lifetimes and the lower bound on the real decoders ---------------------------------------------------------


def model_bucket_graphs():
    for architecture in ARCHITECTURES:
        for entry in tiny_config_buckets(architecture).buckets:
            yield f"{architecture}-{entry.bucket.name}", entry.specialised
    for entry in checkpoint_buckets().buckets:
        yield f"tiny-llama-{entry.bucket.name}", entry.specialised


def recomputed_lifetimes(gm: fx.GraphModule, liveness: Liveness) -> dict:
    """(first, last) of each storage from scratch: its allocating node, and the last node reading any value
    whose storage it is (the output node included)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    lifetimes = {key: [order[key[0]], order[key[0]]] for key in liveness.storages}
    for n in gm.graph.nodes:
        for arg in n.all_input_nodes:
            value = arg.meta.get("val")
            for i in range(len(value) if isinstance(value, (list, tuple)) else 1):
                key = liveness.storage_of.get((arg, i))
                if key in lifetimes:
                    lifetimes[key][1] = max(lifetimes[key][1], order[n])
    return {key: tuple(span) for key, span in lifetimes.items()}


def test_model_graphs_lifetimes_sizes_and_pins():
    for name, gm in model_bucket_graphs():
        liveness = Liveness(gm)
        sizes = gm.meta["sizes"]
        lifetimes = recomputed_lifetimes(gm, liveness)
        for key, s in liveness.storages.items():
            assert (s.start, s.end) == lifetimes[key], f"{name}: {s.name}"
            assert all(isinstance(d, int) for d in s.shape), f"{name}: {s.name} has a symbolic size"
        # The residual stream's first value: [num_tokens, hidden], for this bucket's num_tokens.
        embedding = calls(gm, aten.embedding.default)[0]
        hidden = embedding.args[0].meta["val"].shape[1]
        assert liveness.storages[(embedding, 0)].shape == (sizes["num_tokens"], hidden), name
        # The logits leave the graph: pinned, never planned.
        (logits,) = next(iter(reversed(gm.graph.nodes))).all_input_nodes
        assert liveness.storage_of[(logits, 0)] in liveness.pinned, name
        assert liveness.storage_of[(logits, 0)] not in {s.key for s in liveness.planned()}, name
        # KV caches are written in place by attention, never planned.
        kv = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("kv_cache_")]
        assert all((n, 0) in liveness.pinned for n in kv)


def test_lower_bound_is_the_peak_of_live_bytes():
    rng = random.Random(0)
    for name, gm in [
        *model_bucket_graphs(),
        ("views", fake_graph(views, torch.randn(4, 8))),
        ("multi_output", fake_graph(multi_output, torch.randn(6, 4), torch.randn(6, 4))),
        ("escaping", fake_graph(escaping, torch.randn(4, 8))),
    ]:
        liveness = Liveness(gm)
        planned = liveness.planned()
        subsets = [planned, list(liveness.storages.values()), rng.sample(planned, len(planned) // 2), []]
        for storages in subsets:
            expected = peak_live_bytes([(s.nbytes, s.start, s.end) for s in storages])
            assert liveness.lower_bound(storages) == expected, name
