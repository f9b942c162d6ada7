"""The capture-safety audit: no op in any bucket graph of any architecture's artifact synchronises with the host.

Graph replay (CUDA graphs, aclgraph) records device work once and replays it: an op that reads a device
value on the host (``.item()``, ``.tolist()``, ``int(t)``: all ``aten._local_scalar_dense``), makes a tensor
from host data (``torch.tensor(list)``: ``aten.lift_fresh``), or whose output shape depends on values
(``nonzero``, ``masked_select``, ``unique``, boolean indexing) cannot be recorded. Each graph runs here under
FakeTensorMode, where tensors have shapes and dtypes but no values, so such an op raises (fake tensors do
it for data-dependent shapes, ``HostSyncAudit`` for the rest). The ``xllm::`` ops run as the composites
the CUDA and NPU platforms run where no fused kernel takes them (ops.KERNELS, with the capture-safe
attention and MoE experts of ops.CAPTURE_SAFE_KERNELS in place of the CPU's host-side paths), nested op calls
included.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import sympy
import torch
from torch import fx
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from tests.hf_oracle import ARCHITECTURE_CONFIGS, MOE_ARCHITECTURE_CONFIGS
from xllm_compiler.artifact.graph_format import deserialize_graph
from xllm_compiler.artifact.manifest import read_manifest
from xllm_compiler.dtypes import DTYPES
from xllm_compiler.interface import MAX_BLOCKS_PER_SEQ, NUM_BLOCKS, NUM_SEQS, NUM_TOKENS
from xllm_compiler.ops import CAPTURE_SAFE_KERNELS, KERNELS, attention

ARCHITECTURES = sorted(ARCHITECTURE_CONFIGS) + sorted(MOE_ARCHITECTURE_CONFIGS)
COMPOSITES: dict[str, Callable] = {**KERNELS, **CAPTURE_SAFE_KERNELS}
#: Sizes for the dims a graph leaves symbolic (the dynamic fallback's num_tokens, the KV pool's blocks).
SIZES = {NUM_TOKENS: 24, NUM_SEQS: 3, NUM_BLOCKS: 9, MAX_BLOCKS_PER_SEQ: 4}


class HostSync(AssertionError):
    """An op that would make the device wait for the host, or the host for the device."""


class HostSyncAudit(TorchDispatchMode):
    """Refuses ops that read device values on the host or copy host data into a new tensor."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.data_dependent_output in func.tags:
            raise HostSync(f"{func} reads a device value on the host")
        if func.overloadpacket is torch.ops.aten.lift_fresh:
            raise HostSync(f"{func}: a tensor made from host data (torch.tensor) is copied to the device")
        return func(*args, **(kwargs or {}))


def _size(size: int | str) -> int:
    return size if isinstance(size, int) else int(sympy.sympify(size).subs(SIZES))


def _fake_value(meta: dict | None, where: str) -> torch.Tensor:
    """A value-less tensor of the shape and dtype the artifact recorded (called under FakeTensorMode)."""
    if not isinstance(meta, dict) or "shape" not in meta:
        raise AssertionError(f"{where} records no tensor shape")
    return torch.zeros([_size(s) for s in meta["shape"]], dtype=DTYPES[meta["dtype"]])


def _run(node: fx.Node, env: dict[fx.Node, object]) -> object:
    """One node's value: fake for inputs, weights and arena buffers; xllm ops as their device composites."""
    if node.op in ("placeholder", "get_attr"):
        return _fake_value(node.meta["xllm_meta"], f"{node.op} {node.target}")
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "xllm":
        target = COMPOSITES[target.name().removesuffix(".default")]
    return target(*args, **kwargs)


def audit_graph(graph: fx.Graph, where: str) -> None:
    """Fail, naming the node, if any op of ``graph`` (or inside its xllm ops) is not capture-safe."""
    env: dict[fx.Node, object] = {}
    with FakeTensorMode(), HostSyncAudit():
        for node in graph.nodes:
            if node.op == "output":
                continue
            try:
                env[node] = _run(node, env)
            except (HostSync, DataDependentOutputException, DynamicOutputShapeException) as exc:
                pytest.fail(f"{where}: node {node.name} ({node.target}) is not capture-safe: {exc}")


def artifact_graphs(root: Path) -> dict[str, fx.Graph]:
    """Every graph of an artifact (each bucket's and the dynamic fallback), as the runtime deserialises it."""
    manifest = read_manifest(root, verify=False)
    return {
        rel: deserialize_graph(json.loads((root / rel).read_text()), torch.device("cpu"), where=rel)
        for rel in manifest.graph_files().values()
    }


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_no_bucket_graph_synchronises_with_the_host(checkpoints, architecture):
    model_dir, _ = checkpoints.checkpoint(architecture)
    graphs = artifact_graphs(checkpoints.artifact(model_dir))
    assert len(graphs) > 2
    for rel, graph in graphs.items():
        attention_nodes = [n for n in graph.nodes if str(n.target).startswith("xllm.paged_attention")]
        assert len(attention_nodes) == 2, rel  # one per layer: the audit runs the composites of real graphs
        audit_graph(graph, f"{architecture} {rel}")


def test_every_xllm_op_has_a_composite_to_audit():
    """A new op or out form must come with a composite, or the audit above could not run it."""
    assert {f"xllm::{op}" for op in torch.ops.xllm} <= set(COMPOSITES)


def _fake_attention_args(num_tokens: int, num_seqs: int, sliding_window: int, token_offset: int) -> tuple:
    query = torch.zeros(num_tokens, 4, 8)
    kv = torch.zeros(num_tokens, 2, 8)
    cache = torch.zeros(2, 9, 4, 2, 8)
    lengths = [torch.zeros(num_seqs, dtype=torch.int32) for _ in range(2)]
    tables = torch.zeros(num_seqs, 5, dtype=torch.int32)
    slots = torch.zeros(num_tokens, dtype=torch.int64)
    return query, kv, kv, cache, slots, *lengths, tables, 0.3, sliding_window, token_offset


@pytest.mark.parametrize("num_tokens, num_seqs", [(6, 6), (24, 2)], ids=["context-per-token", "all-contexts"])
@pytest.mark.parametrize("sliding_window, token_offset", [(0, 0), (3, 0), (0, 5), (3, 7)])
def test_attention_composite_is_capture_safe_with_every_option(num_tokens, num_seqs, sliding_window, token_offset):
    """What the artifacts above may not reach: both layouts, sliding windows and micro-batch halves."""
    with FakeTensorMode(), HostSyncAudit():
        args = _fake_attention_args(num_tokens, num_seqs, sliding_window, token_offset)
        assert CAPTURE_SAFE_KERNELS["xllm::paged_attention"](*args).shape == (num_tokens, 4, 8)


#: Ways to break capture safety that the audit must catch.
HOST_SYNCS = {
    "tolist": lambda lens: lens.tolist(),
    "item": lambda lens: lens.max().item(),
    "int": lambda lens: int(lens[0]),
    "nonzero": lambda lens: lens.nonzero(),
    "boolean-index": lambda lens: lens[lens > 0],
    "host-data": lambda lens: torch.tensor([1, 2, 3]) + 1,
}


@pytest.mark.parametrize("sync", HOST_SYNCS)
def test_the_audit_catches_a_host_sync_inside_attention(checkpoints, monkeypatch, sync):
    """The audit is not vacuous: a .tolist() (or any of HOST_SYNCS) put back into the composite fails it."""
    layout = attention.token_layout

    def syncing_layout(query_lens, *args):
        HOST_SYNCS[sync](query_lens)
        return layout(query_lens, *args)

    monkeypatch.setattr(attention, "token_layout", syncing_layout)
    rel, graph = next(
        iter(artifact_graphs(checkpoints.artifact(checkpoints.checkpoint("LlamaForCausalLM")[0])).items())
    )
    with pytest.raises(pytest.fail.Exception, match=r"node \w+ \(xllm\.paged_attention.*not capture-safe"):
        audit_graph(graph, rel)
