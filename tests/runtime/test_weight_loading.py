"""Weights read one tensor at a time (runtime/weights.py) and packed as they arrive (the CPU platform's hook).

The point is the load's peak memory (tools/measure_load.py measures it on a real-sized model); here, that
giving a dropped tensor's pages back never touches what was kept, and, on a tiny tied-embedding Llama,
that the hook keeps exactly what the lowered graphs read: the packed form of every linear weight (the tied
embedding gathers from it too) and the plain form of everything else.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from xllm_compiler.artifact.graph_format import deserialize_graph
from xllm_compiler.artifact.writer import WEIGHTS_FILE
from xllm_compiler.ops.native import native_kernels
from xllm_compiler.runtime.platform.cpu import LINEAR, PACKED_SUFFIX, CpuPlatform, packable_dtypes
from xllm_compiler.runtime.weights import read_weights

CPU = torch.device("cpu")


def test_reads_every_tensor_as_load_file_does(tmp_path):
    tensors = {"b": torch.arange(6.0).view(2, 3), "a": torch.ones(4, dtype=torch.bfloat16)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    read = read_weights(tmp_path / "w.safetensors", CPU)
    expected = load_file(str(tmp_path / "w.safetensors"))
    assert read.keys() == expected.keys()
    assert all(torch.equal(read[name], expected[name]) and read[name].dtype == expected[name].dtype for name in read)


def test_keeps_only_what_the_hook_returns(tmp_path):
    save_file({"keep": torch.ones(2), "drop": torch.zeros(2), "both": torch.full((2,), 3.0)}, str(tmp_path / "w.st"))
    seen = []

    def prepare(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        seen.append(name)
        return {"keep": {name: tensor}, "drop": {}, "both": {name: tensor, name + "_twice": tensor * 2}}[name]

    read = read_weights(tmp_path / "w.st", CPU, prepare)
    assert sorted(seen) == ["both", "drop", "keep"]  # each tensor handed over once
    assert sorted(read) == ["both", "both_twice", "keep"]
    assert read["both_twice"].tolist() == [6.0, 6.0]


def test_giving_back_dropped_pages_leaves_what_was_kept_intact(tmp_path):
    # Small tensors share pages with their neighbours; big ones span many. Dropping every other one gives
    # their pages back; what was kept, a view of a tensor among them, must read the same afterwards.
    generator = torch.Generator().manual_seed(0)
    tensors = {f"t{i:02d}": torch.randn(size, generator=generator) for i, size in enumerate([3, 5000, 7, 70000] * 4)}
    save_file(tensors, str(tmp_path / "w.st"))

    def prepare(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        index = int(name[1:])
        return {} if index % 2 else {name: tensor[1:] if index % 4 == 2 else tensor}

    read = read_weights(tmp_path / "w.st", CPU, prepare)
    assert sorted(read) == sorted(name for name in tensors if int(name[1:]) % 2 == 0)
    for name, tensor in read.items():
        expected = tensors[name][1:] if int(name[1:]) % 4 == 2 else tensors[name]
        assert torch.equal(tensor, expected), name


def test_unreadable_file_raises_what_load_file_raises(tmp_path):
    (tmp_path / "w.st").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception) as caught:
        read_weights(tmp_path / "w.st", CPU)
    with pytest.raises(type(caught.value)):
        load_file(str(tmp_path / "w.st"))


@pytest.fixture(scope="module")
def tied_artifact(checkpoints):
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM", tie_word_embeddings=True)
    return checkpoints.artifact(model_dir)


def _graphs(artifact) -> dict:
    """Every graph of the artifact, as load() reads them."""
    return {
        p.stem: deserialize_graph(json.loads(p.read_text()), CPU, where=p.name) for p in artifact.glob("graphs/*.json")
    }


@pytest.mark.skipif(torch.float32 not in packable_dtypes(), reason="this build packs no float32 linear layers")
def test_cpu_keeps_each_linear_weight_packed_only(tied_artifact):
    graphs, platform = _graphs(tied_artifact), CpuPlatform()
    stored = load_file(str(tied_artifact / WEIGHTS_FILE))
    linear_weights = {
        n.args[1].target for g in graphs.values() for n in g.nodes if n.op == "call_function" and n.target in LINEAR
    }
    weights = read_weights(tied_artifact / WEIGHTS_FILE, CPU, platform.weight_preparer(graphs))
    platform.lower(graphs, weights)

    assert weights.keys() == {name + PACKED_SUFFIX for name in linear_weights} | (stored.keys() - linear_weights)
    # The tied table is read by the embedding too, which now gathers from the packed lm_head.
    native = native_kernels()
    gathers = [
        n
        for g in graphs.values()
        for n in g.nodes
        if n.target in (native.packed_embedding_out, native.packed_embedding)
    ]
    assert len(gathers) == len(graphs) and all(n.args[0].target.endswith(PACKED_SUFFIX) for n in gathers)
    used = {n.target for g in graphs.values() for n in g.nodes if n.op == "get_attr"}
    assert weights.keys() <= used  # nothing held that no graph reads
