"""tools/show_graph.py: the diff shows each fusion's op appear and the ops it replaces go, the pictures
are well-formed SVG with a box per node, and the page holds both pictures and the diff."""

from __future__ import annotations

import html
import importlib.util
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest

from xllm_compiler.passes import default_pipeline
from xllm_compiler.testing import tiny_config

ROOT = Path(__file__).resolve().parents[2]
TINY_LLAMA = ROOT / "tools" / "tiny-llama"
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def show_graph():
    spec = importlib.util.spec_from_file_location("show_graph", ROOT / "tools" / "show_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def changed_lines(out: str) -> tuple[list[str], list[str]]:
    """(removed, added) lines of the unified diff in the tool's output."""
    lines = out.splitlines()
    removed = [line[1:] for line in lines if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in lines if line.startswith("+") and not line.startswith("+++")]
    return removed, added


def node_groups(svg: ET.Element) -> list[ET.Element]:
    return [g for g in svg.iter(f"{SVG}g") if g.get("class") == "node"]


def calls(lines: list[str], op: str) -> int:
    return sum(f"= {op}(" in line for line in lines)


# pass -> (the op it introduces, how many in a 2-layer Llama, the ops it removes: how many go)
FUSIONS = {
    "fuse_add_rms_norm": ("xllm.fused_add_rms_norm", 4, {"aten.rsqrt": 4, "aten.pow.Tensor_Scalar": 4}),
    "fuse_rotary_embedding": ("xllm.rotary_embedding", 2, {"aten.neg": 4, "aten.cat": 4, "aten.slice.Tensor": 8}),
    "merge_qkv_projections": ("aten.split_with_sizes", 2, {}),
}


@pytest.mark.parametrize("pass_name", list(FUSIONS))
def test_diff_and_pictures_of_a_fusion(show_graph, pass_name, tmp_path, capsys):
    svg_path, html_path = tmp_path / "out.svg", tmp_path / "page" / "out.html"
    argv = ["LlamaForCausalLM", "--pass", pass_name, "--svg", str(svg_path), "--html", str(html_path)]
    assert show_graph.main(argv) == 0
    out = capsys.readouterr().out
    assert "PassResult(changed=True, matches=" in out
    assert re.search(r"call_function nodes: \d+ -> \d+", out)

    removed, added = changed_lines(out)
    fused, count, gone = FUSIONS[pass_name]
    assert calls(added, fused) == count
    assert calls(removed, fused) == 0
    for op, count in gone.items():
        assert calls(removed, op) == count, op
        assert calls(added, op) == 0, op
    if pass_name == "merge_qkv_projections":  # three linears per layer become one on the concatenated weight
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert sum(f"self_attn.{proj}.weight)" in line and "aten.linear(" in line for line in removed) == 2
        assert sum(" = aten.linear(" in line and "cat_default" in line for line in added) == 2

    root = ET.parse(svg_path).getroot()
    before, after = (root.find(f"{SVG}svg[@id='{side}']") for side in ("before", "after"))
    for picture in (before, after):
        groups = node_groups(picture)
        assert len(groups) > 10
        assert all(len(g.findall(f"{SVG}rect")) == 1 for g in groups)
        arrows = {path.get("marker-end") for path in picture.iter(f"{SVG}path") if path.get("marker-end")}
        assert arrows == {f"url(#{picture.get('id')}-arrow)"}  # ids stay unique with both in one page
        assert picture.find(f".//{SVG}marker[@id='{picture.get('id')}-arrow']") is not None
    assert fused in {g.get("data-op") for g in node_groups(after)}
    assert fused not in {g.get("data-op") for g in node_groups(before)}

    page = html_path.read_text()
    for side in ("before", "after"):
        match = re.search(rf'<svg xmlns="http://www.w3.org/2000/svg" id="{side}".*?</svg>', page, re.S)
        assert match, side
        ET.fromstring(match.group(0))
    assert html.escape(added[0]) in page and html.escape(removed[0]) in page


@pytest.fixture(scope="module")
def fused_norms(show_graph):
    return show_graph.compare(tiny_config("LlamaForCausalLM"), "fuse_add_rms_norm")


def test_a_box_per_node_coloured_by_change(show_graph, fused_norms):
    comparison = fused_norms
    removed, added, _ = comparison.changes()
    root = ET.fromstring(show_graph.combined_svg(comparison, 0))
    for side, snapshot, changed, fill in (
        ("before", comparison.before, removed, "#fde0dc"),
        ("after", comparison.after, added, "#dcf5dd"),
    ):
        groups = {g.get("data-name"): g for g in node_groups(root.find(f"{SVG}svg[@id='{side}']"))}
        layer_nodes = {n.name for n in snapshot.layer_nodes(0)}
        assert layer_nodes <= groups.keys()  # plus dashed boxes for inputs from other layers
        for name in layer_nodes:
            (rect,) = groups[name].findall(f"{SVG}rect")
            assert (rect.get("fill") == fill) == (name in changed), name


def test_layers_follow_weights_and_kv_caches(fused_norms):
    """The residual add that ends a layer fuses with the next layer's input norm: layer 0 keeps one
    fused_add_rms_norm, layer 1 two, and the final norm's belongs to no layer."""
    comparison = fused_norms
    fused = Counter(n.layer for n in comparison.after.values() if n.op == "xllm.fused_add_rms_norm")
    assert fused == {0: 1, 1: 2, None: 1}
    for view in comparison.after.values():
        if "model.layers.1." in view.line and view.kind == "call_function":
            assert view.layer == 1, view.line
    attention = [n.layer for n in comparison.after.values() if n.op == "xllm.paged_attention"]
    assert attention == [0, 1]


def test_tiny_llama_checkpoint_one_layer(show_graph, tmp_path, capsys):
    page = tmp_path / "tiny.html"
    assert show_graph.main([str(TINY_LLAMA), "--pass", "fuse_silu_and_mul", "--layer", "3", "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert "4 layers" in out and "(layer 3)" in out
    removed, added = changed_lines(out)
    assert calls(added, "xllm.silu_and_mul") == 1 and calls(removed, "aten.silu") == 1
    assert all("layers.3." in line or "layers." not in line for line in removed + added)
    assert page.read_text().count('<svg xmlns="http://www.w3.org/2000/svg" id="') == 2


def test_list_prints_the_pipeline_in_order(show_graph, capsys):
    assert show_graph.main(["--list"]) == 0
    assert capsys.readouterr().out.split() == [p.name for p in default_pipeline()]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["LlamaForCausalLM", "--pass", "no_such_pass"], "unknown pass no_such_pass"),
        (["NoSuchForCausalLM", "--pass", "fuse_rms_norm"], "neither a checkpoint folder nor a known architecture"),
        (["LlamaForCausalLM", "--pass", "fuse_rms_norm", "--layer", "2"], "--layer 2 is out of range"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(show_graph, argv, message, capsys):
    assert show_graph.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_text_is_escaped_in_the_svg(show_graph):
    box = show_graph.Box('a<b>&"c"', [("op<&>", "op"), ("f32[2]", "type")], "added", title="x < y & z")
    svg, _, _ = show_graph.render_svg({box.name: box}, [], "t")
    (group,) = node_groups(ET.fromstring(svg))
    assert group.get("data-name") == 'a<b>&"c"'
    assert group.find(f"{SVG}title").text == "x < y & z"
