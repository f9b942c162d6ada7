"""The default pipeline end to end: fused op counts as a function of depth, numerics, pass selection,
the PassManager's records and checks, and the compile report."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import fx

from tests.passes.graphs import ARCHITECTURES, aten, model_graph, xllm
from xllm_compiler.artifact.manifest import read_manifest
from xllm_compiler.errors import CompileError, OptionsError
from xllm_compiler.passes import GraphPass, PassManager, PassResult, default_pipeline, select_passes
from xllm_compiler.passes.verify import TOLERANCE, NumericsCheck, relative_error, run_steps, sample_steps
from xllm_compiler.testing import op_counts

GONE = (
    aten.pow.Tensor_Scalar,
    aten.rsqrt.default,
    aten.mean.dim,
    aten.silu.default,
    aten.neg.default,
    aten.cat.default,
    aten.mul.Tensor,
    aten.add.Tensor,
)


def expected_ops(architecture: str, layers: int) -> dict:
    """What the pipeline leaves of an ``layers``-deep model: every norm, MLP and rotary fused, and per
    layer one qkv, one o, one gate_up and one down matmul, plus the LM head."""
    return {
        xllm.fused_add_rms_norm.default: 2 * layers,
        xllm.rms_norm.default: 1 + (2 * layers if architecture == "Qwen3ForCausalLM" else 0),
        xllm.silu_and_mul.default: layers,
        xllm.rotary_embedding.default: layers,
        xllm.paged_attention.default: layers,
        aten.linear.default: 4 * layers + 1,
        **dict.fromkeys(GONE, 0),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_pipeline_fuses_everything_and_keeps_the_numerics(architecture, num_layers, dtype):
    gm = model_graph(architecture, num_layers, dtype)
    steps, caches = sample_steps(gm)
    reference = run_steps(gm, steps, caches)

    records = PassManager(default_pipeline()).run(gm)

    counts = op_counts(gm)
    assert {target: counts[target] for target in expected_ops(architecture, num_layers)} == expected_ops(
        architecture, num_layers
    )
    assert relative_error(run_steps(gm, steps, caches), reference) <= TOLERANCE[dtype]
    matches = {r.name: r.matches for r in records}
    assert matches["merge_qkv_projections"] == matches["merge_gate_up_projections"] == num_layers
    assert matches["fold_constants"] == num_layers * (3 if architecture == "Qwen2ForCausalLM" else 2)


# -- select_passes -------------------------------------------------------------------------------

PIPELINE = [p.name for p in default_pipeline()]


def names(passes):
    return [p.name for p in passes]


def test_select_passes_all_by_default():
    assert names(select_passes(None)) == PIPELINE


def test_select_passes_keeps_pipeline_order_whatever_order_names_come_in():
    chosen = ["fuse_rotary_embedding", "remove_noop_ops", "fuse_add_rms_norm"]
    assert names(select_passes(chosen)) == ["remove_noop_ops", "fuse_add_rms_norm", "fuse_rotary_embedding"]
    assert names(select_passes(list(reversed(PIPELINE)))) == PIPELINE


@pytest.mark.parametrize("nothing", [["none"], [], ()])
def test_select_passes_none(nothing):
    assert select_passes(nothing) == []


def test_select_passes_disable():
    assert names(select_passes(None, disabled=["fold_constants", "fuse_rms_norm"])) == [
        n for n in PIPELINE if n not in ("fold_constants", "fuse_rms_norm")
    ]
    assert names(select_passes(["fuse_rms_norm", "fold_constants"], disabled=["fold_constants"])) == ["fuse_rms_norm"]


@pytest.mark.parametrize("kwargs", [dict(names=["fuse_everything"]), dict(names=None, disabled=["fuse_everything"])])
def test_select_passes_refuses_unknown_names(kwargs):
    with pytest.raises(OptionsError, match="fuse_everything"):
        select_passes(kwargs["names"], kwargs.get("disabled", ()))


def test_pass_identities_are_distinct_and_follow_the_version():
    identities = {p.identity() for p in default_pipeline()}
    assert len(identities) == len(PIPELINE)
    assert {p.identity() for p in default_pipeline()} == identities, "stable from one call to the next"
    bumped = DoubleOutput()
    before = bumped.identity()
    bumped.version = 2
    assert bumped.identity() != before


# -- PassManager ---------------------------------------------------------------------------------


class DoubleOutput(GraphPass):
    """A deliberately wrong pass: multiplies the logits by 2."""

    name, version = "double_output", 1

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        output = next(n for n in gm.graph.nodes if n.op == "output")
        logits = output.args[0][0]
        with gm.graph.inserting_before(output):
            doubled = gm.graph.call_function(aten.mul.Tensor, (logits, 2.0))
        doubled.meta["val"] = logits.meta["val"]
        output.args = ((doubled, *output.args[0][1:]),)
        return PassResult(changed=True, matches=1)


class Unordered(GraphPass):
    """A deliberately broken pass: moves the last op before the first, ahead of its inputs."""

    name, version = "unordered", 1

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        ops = [n for n in gm.graph.nodes if n.op == "call_function"]
        ops[0].prepend(ops[-1])
        return PassResult(changed=True, matches=1)


def test_pass_manager_records_every_pass():
    gm = model_graph("LlamaForCausalLM", 2)
    pipeline = default_pipeline()

    records = PassManager(pipeline).run(gm)

    assert [(r.name, r.version) for r in records] == [(p.name, p.version) for p in pipeline]
    for record in records:
        assert set(record.to_json()) == {"name", "version", "seconds", "nodes_before", "nodes_after", "matches"}
        assert record.seconds >= 0
    for earlier, later in itertools.pairwise(records):
        assert later.nodes_before == earlier.nodes_after
    assert records[-1].nodes_after < records[0].nodes_before
    matches = {r.name: r.matches for r in records}
    assert matches["fuse_add_rms_norm"] == 4 and matches["fuse_rms_norm"] == 1
    assert matches["fuse_silu_and_mul"] == matches["fuse_rotary_embedding"] == 2
    assert "xllm.fused_add_rms_norm" in gm.code, "the manager regenerates the code once at the end"


def test_numerics_check_names_the_pass_that_changed_results():
    gm = model_graph("Qwen2ForCausalLM", 1)
    check = NumericsCheck(gm, torch.float32)
    passes = [*select_passes(["remove_noop_ops", "fuse_rms_norm"]), DoubleOutput()]

    with pytest.raises(CompileError, match="double_output"):
        PassManager(passes, check=check).run(gm)
    assert check.errors["remove_noop_ops"] <= TOLERANCE[torch.float32]
    assert check.errors["fuse_rms_norm"] <= TOLERANCE[torch.float32]
    assert check.errors["double_output"] > 0.5


def test_numerics_check_says_where_the_largest_difference_is():
    gm = model_graph("LlamaForCausalLM", 1)
    gm.recompile()
    check = NumericsCheck(gm, torch.float32)
    prefill = check.last[0]  # doubling moves every logit by itself: the largest one moves most
    sequence, token = divmod(int(prefill.abs().argmax()), prefill.shape[1])

    with pytest.raises(CompileError) as caught:
        PassManager([DoubleOutput()], check=check).run(gm)

    moved = f"{prefill.abs().max().item():.3g}"
    assert str(caught.value) == (
        f"pass double_output v1 changed the graph's results (--verify): in the prefill step, logit {token} of "
        f"sequence {sequence} moved by {moved} (1 of the largest logit), over the tolerance 0.0001"
    )


def test_numerics_check_passes_the_real_pipeline():
    gm = model_graph("Qwen3ForCausalLM", 1)
    check = NumericsCheck(gm, torch.float32)
    PassManager(default_pipeline(), check=check).run(gm)
    assert set(check.errors) == set(PIPELINE)
    assert max(check.errors.values()) <= TOLERANCE[torch.float32]


def test_an_invalid_graph_fails_at_the_pass_that_made_it():
    gm = model_graph("LlamaForCausalLM", 1)
    with pytest.raises(CompileError, match="unordered"):
        PassManager([*select_passes(["remove_noop_ops"]), Unordered()]).run(gm)


def test_debug_dump_writes_the_graph_before_and_after_every_pass(tmp_path):
    gm = model_graph("MistralForCausalLM", 1)
    passes = select_passes(["remove_noop_ops", "fuse_add_rms_norm"])
    PassManager(passes, dump_dir=tmp_path).run(gm)
    dumped = sorted(p.name for p in tmp_path.iterdir())
    assert dumped == ["00_captured.py", "01_remove_noop_ops.py", "02_fuse_add_rms_norm.py"]
    assert "fused_add_rms_norm" not in (tmp_path / "01_remove_noop_ops.py").read_text()
    assert "fused_add_rms_norm" in (tmp_path / "02_fuse_add_rms_norm.py").read_text()


# -- the compile report --------------------------------------------------------------------------

COMPILE_OPTIONS = dict(decode_buckets=(1,), prefill_buckets=(8,), max_seq_len=32)


def test_report_json_lists_every_pass_with_what_it_did(checkpoints):
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    out = checkpoints.artifact(model_dir, **COMPILE_OPTIONS)

    report = json.loads((out / "report.json").read_text())
    passes = report["passes"]
    assert [p["name"] for p in passes] == PIPELINE
    for entry in passes:
        assert set(entry) == {"name", "version", "seconds", "nodes_before", "nodes_after", "matches"}
    layers = report["model"]["num_layers"]
    matches = {p["name"]: p["matches"] for p in passes}
    assert matches["fuse_add_rms_norm"] == 2 * layers and matches["fuse_rms_norm"] == 1
    assert matches["fuse_silu_and_mul"] == matches["fuse_rotary_embedding"] == layers
    assert matches["merge_qkv_projections"] == matches["merge_gate_up_projections"] == layers
    manifest = read_manifest(out)
    assert [(p.name, p.version) for p in manifest.passes] == [(p["name"], p["version"]) for p in passes]


def test_compile_with_verify_names_a_pass_that_changes_results(checkpoints, tmp_path):
    import xllm_compiler

    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    with pytest.raises(CompileError, match="double_output"):
        xllm_compiler.compile(
            model_dir, tmp_path / "out", extra_passes=[DoubleOutput()], verify=True, **COMPILE_OPTIONS
        )
