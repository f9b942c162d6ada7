"""A pass that fails, fails by name: whatever it raises reaches the user as a CompileError naming the
pass, its version, the node it was working on and, with --debug-dump, the file holding the graph it
was given; bad input it reports (an InputError) stays what it is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import fx

import xllm_compiler
from tests.passes.graphs import aten, model_graph
from xllm_compiler.errors import CompileError, OptionsError
from xllm_compiler.passes import GraphPass, PassManager, PassResult, select_passes


class LookUpScales(GraphPass):
    """A pass with a bug: it looks every linear's weight up in a table of scales that lacks them."""

    name, version = "look_up_scales", 3

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        scales: dict[str, torch.Tensor] = {}
        for node in gm.graph.nodes:
            if node.target is aten.linear.default:
                scales[node.args[1].target].mul_(2)  # KeyError: no such scale
        return PassResult(changed=False)


class RefusesOption(GraphPass):
    """A pass that reports bad input, as a pass checking its options would."""

    name, version = "refuses_option", 1

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        raise OptionsError("refuses_option: block size 7 is not a power of two")


def first_linear(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.target is aten.linear.default)


def test_an_exception_becomes_a_compile_error_naming_the_pass_its_version_and_node():
    gm = model_graph("LlamaForCausalLM", 1)
    linear = first_linear(gm)

    with pytest.raises(CompileError) as caught:
        PassManager([LookUpScales()]).run(gm)

    message = str(caught.value)
    assert message.startswith("pass look_up_scales v3 failed at node "), message
    assert f"at node {linear.name} (aten.linear.default): KeyError: '{linear.args[1].target}'" in message
    assert isinstance(caught.value.__cause__, KeyError), "the original is chained"
    assert "\n" not in message and "graph it was given" not in message  # no dump asked for


def test_an_input_error_from_a_pass_is_left_as_it_is():
    gm = model_graph("LlamaForCausalLM", 1)
    with pytest.raises(OptionsError, match="block size 7") as caught:
        PassManager([RefusesOption()]).run(gm)
    assert not isinstance(caught.value, CompileError)


def test_with_a_debug_dump_the_error_names_the_graph_the_pass_was_given(tmp_path):
    gm = model_graph("LlamaForCausalLM", 1)
    passes = [*select_passes(["remove_noop_ops"]), LookUpScales()]

    with pytest.raises(CompileError) as caught:
        PassManager(passes, dump_dir=tmp_path).run(gm)

    given = tmp_path / "01_remove_noop_ops.py"
    assert str(caught.value).endswith(f"(the graph it was given: {given})")
    assert given.is_file() and "torch.ops.aten.linear.default" in given.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00_captured.py", "01_remove_noop_ops.py"]


def test_compile_names_a_failing_extra_pass_and_leaves_nothing(checkpoints, tmp_path):
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    out, dump = tmp_path / "out", tmp_path / "dump"

    with pytest.raises(CompileError) as caught:
        xllm_compiler.compile(
            model_dir,
            out,
            extra_passes=[LookUpScales()],
            debug_dump=str(dump),
            decode_buckets=(1,),
            prefill_buckets=(8,),
            max_seq_len=32,
        )

    message = str(caught.value)
    assert message.startswith("pass look_up_scales v3 failed at node "), message
    given = Path(message.rpartition("(the graph it was given: ")[2].rstrip(")"))
    assert given.parent == dump and given.is_file(), message
    assert given.name.endswith("_select_rows_before_final_norm.py"), "the pipeline's last graph, before ours"
    assert not out.exists()
