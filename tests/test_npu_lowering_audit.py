"""The NPU lowering audit, on CPU: every op of every graph planned for NPU has an NPU kernel in the table
(runtime/platform/lowering.py), for every supported architecture, so a fusion added without an NPU kernel
fails here and not on a customer's NPU.

Graphs are planned for NPU through the compiler's own ``bucket_passes_for`` with the NPU table; one full
compile with ``--device npu`` runs with the platform's availability faked (nothing here touches torch_npu)
and checks what the artifact records, and that a CPU runs what was planned for NPU.
"""

from __future__ import annotations

import json

import pytest
import torch

import xllm_compiler
from tests.passes.graphs import ARCHITECTURES, cached_build_graph, model_graph
from xllm_compiler.artifact.graph_format import deserialize_graph
from xllm_compiler.artifact.manifest import read_manifest
from xllm_compiler.artifact.schema import LoweringRecord
from xllm_compiler.buckets import DECODE, PREFILL, Bucket
from xllm_compiler.buckets.specialize import specialize
from xllm_compiler.compiler import bucket_passes_for
from xllm_compiler.errors import OptionsError
from xllm_compiler.options import make_options
from xllm_compiler.passes import PassManager, select_passes
from xllm_compiler.runtime.platform import PLATFORMS
from xllm_compiler.runtime.platform.base import available_host_memory
from xllm_compiler.runtime.platform.lowering import NPU_LOWERING, composite_lowering
from xllm_compiler.runtime.platform.npu import NpuPlatform
from xllm_compiler.testing import op_counts, tiny_config

xllm = torch.ops.xllm
BUCKETS = (Bucket(DECODE, 4, 4), Bucket(PREFILL, 32, 4))
NPU_BLOCK_SIZE = 128


def _planned(architecture: str, lowering, gm: torch.fx.GraphModule | None = None) -> dict[str, torch.fx.GraphModule]:
    """The fallback graph and two bucket graphs of a one-layer model (or ``gm``), memory planned for ``lowering``."""
    gm = gm if gm is not None else model_graph(architecture, 1)
    PassManager(select_passes(None)).run(gm)
    passes = bucket_passes_for(make_options(block_size=NPU_BLOCK_SIZE), lowering)
    graphs = {"dynamic": gm}
    for bucket in BUCKETS:
        graphs[bucket.name] = specialize(gm, bucket)
        PassManager(passes).run(graphs[bucket.name])
    return graphs


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_op_planned_for_npu_has_an_npu_kernel(architecture):
    for name, gm in _planned(architecture, NPU_LOWERING).items():
        assert NPU_LOWERING.unlowered(gm.graph) == [], name
        counts = op_counts(gm)
        if name != "dynamic":  # planned: attention writes into the arena, the elementwise ops allocate
            assert counts[xllm.paged_attention_out.default] == 1 and counts[xllm.rms_norm_out.default] == 0
            assert counts[xllm.rms_norm.default] >= 1 and gm.meta["memory_plan"].planned_nodes > 0


def test_moe_graphs_planned_for_npu_have_npu_kernels():
    """The routed experts run as their capture-safe composite on NPU, writing into the arena."""
    config = tiny_config(
        "Qwen2MoeForCausalLM",
        num_hidden_layers=1,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    )
    for name, gm in _planned("Qwen2MoeForCausalLM", NPU_LOWERING, cached_build_graph(config)).items():
        assert NPU_LOWERING.unlowered(gm.graph) == [], name
        counts = op_counts(gm)
        assert counts[xllm.fused_moe_out.default if name != "dynamic" else xllm.fused_moe.default] == 1, name


def test_an_op_without_an_npu_kernel_fails_the_audit():
    """A CPU plan's out forms (rms_norm_out, ...) have no NPU kernel: the audit names each node."""
    planned = _planned("LlamaForCausalLM", composite_lowering("cpu"))[BUCKETS[0].name]
    missing = NPU_LOWERING.unlowered(planned.graph)
    assert missing and all("_out" in entry for entry in missing)
    assert any("xllm.rms_norm_out" in entry for entry in missing)


def test_npu_needs_blocks_its_prefill_kernel_takes():
    with pytest.raises(OptionsError, match=r"device 'npu' needs a block_size that is a multiple of 128 .*got 16"):
        bucket_passes_for(make_options(block_size=16), NPU_LOWERING)


class _PlanOnlyNpu(NpuPlatform):
    """The NPU platform, 'available' for planning: the host's memory stands in for the device's."""

    def is_available(self) -> bool:
        return True

    def free_memory_bytes(self) -> int:
        return available_host_memory()

    def total_memory_bytes(self) -> int:
        return available_host_memory()


def test_an_npu_artifact_records_its_lowering_and_runs_on_cpu(checkpoints, monkeypatch, tmp_path):
    model_dir, _ = checkpoints.checkpoint("Qwen2ForCausalLM")
    monkeypatch.setitem(PLATFORMS, "npu", _PlanOnlyNpu)
    out = tmp_path / "npu"
    xllm_compiler.compile(
        model_dir, out, device="npu", block_size=NPU_BLOCK_SIZE, decode_buckets=[1, 2], prefill_buckets=[64]
    )
    manifest = read_manifest(out, verify=False)
    assert (manifest.target_device, manifest.lowering) == ("npu", LoweringRecord("npu", NPU_LOWERING.version))
    for name, rel in manifest.graph_files().items():
        graph = deserialize_graph(json.loads((out / rel).read_text()), torch.device("cpu"), where=rel)
        assert NPU_LOWERING.unlowered(graph) == [], name

    cpu_out = tmp_path / "cpu"
    xllm_compiler.compile(
        model_dir, cpu_out, device="cpu", block_size=NPU_BLOCK_SIZE, decode_buckets=[1, 2], prefill_buckets=[64]
    )
    assert read_manifest(cpu_out, verify=False).lowering == LoweringRecord("cpu", 1)
    prompts = [[5, 6, 7, 8], [9, 10]]
    planned_for_npu = xllm_compiler.load(out, device="cpu").generate(prompts, max_new_tokens=4)
    assert planned_for_npu == xllm_compiler.load(cpu_out).generate(prompts, max_new_tokens=4)


def test_the_default_block_size_is_the_platforms():
    from xllm_compiler.compiler import with_platform_block_size
    from xllm_compiler.options import make_options
    from xllm_compiler.runtime.platform.cpu import CpuPlatform
    from xllm_compiler.runtime.platform.lowering import NPU_LOWERING

    assert with_platform_block_size(make_options(), CpuPlatform().lowering()).block_size == 16
    assert with_platform_block_size(make_options(), NPU_LOWERING).block_size == 128
    assert with_platform_block_size(make_options(block_size=256), NPU_LOWERING).block_size == 256
