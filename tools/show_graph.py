"""Show a graph before and after one pass: what it matched, a text diff, and a picture of one layer.

    python tools/show_graph.py MODEL_DIR_OR_ARCH --pass NAME [--layer N] [--dtype float32]
                               [--num-layers N] [--context N] [--svg out.svg] [--html out.html]
    python tools/show_graph.py --list

MODEL_DIR_OR_ARCH is a checkpoint folder (only its config.json is read: the model gets random weights,
built in memory, so give a large model ``--num-layers 1``) or an architecture name such as
``LlamaForCausalLM`` (a tiny config, 2 layers unless ``--num-layers``).
The pipeline runs up to, not including, the pass; then the pass runs once, and the tool prints its
PassResult, the node and op counts before and after, and a unified diff of the graph's text form, one
line per node in graph order::

    input kv_cache_0: f32[2, num_blocks, 4, 2, 8]
    weight model.layers.0.self_attn.o_proj.weight: f32[32, 32]
    linear_3: f32[num_tokens, 32] = aten.linear(view_3, model.layers.0.self_attn.o_proj.weight)
    getitem_10: f32[num_tokens, 32] = fused_add_rms_norm_default[0]

Nodes keep their fx names: fx keeps the name of a node that a pass leaves alone, and gives new nodes fresh
names (``fused_add_rms_norm_default``, ``getitem_10``), so the diff shows exactly the removed, added
and rewired nodes. Numbering per op instead (mul#0, mul#1, ...) would shift every later number when a
pass removes one node and bury the change in noise. Weights appear by their dotted names, symbolic
sizes by the dim names of ``xllm_compiler.interface`` (``num_tokens``, not ``s72``).

``--layer N`` restricts the diff and the picture to decoder layer N (the picture shows layer 0 when it is
not given). A node belongs to the layer whose weight (``model.layers.N.``) or KV cache (``kv_cache_N``)
it reads; any other node to the first layer that consumes its result; a ``getitem`` to the layer of the
node it unpacks. So the embedding and the rotary table lookups show up in layer 0, the residual add that
ends layer N in layer N+1 (beside the norm it feeds, as fused_add_rms_norm has it), and the final norm
and LM head in no layer.

``--svg`` writes one SVG with the layer before (left) and after (right) the pass: a box per node (op, fx
name, shape, and the weights and graph inputs it reads), arrows for data flow, top to bottom in
topological generations. Removed nodes are red, added ones green, rewired ones (same name, new inputs)
amber, nodes of other layers dashed grey; a thick border marks a result used outside the layer. Hover a
box for its line of the text form. ``--html`` writes one self-contained page: summary, both pictures, diff.
"""

from __future__ import annotations

import argparse
import difflib
import html
import operator
import re
import sys
import textwrap
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import sympy
import torch
from torch import fx

from xllm_compiler.console import EXIT_OK, OneLineParser, guarded
from xllm_compiler.dtypes import MODEL_DTYPES as DTYPES
from xllm_compiler.errors import CompileError, ConfigError, OptionsError
from xllm_compiler.models import spec_from_config
from xllm_compiler.models.config import read_config
from xllm_compiler.models.registry import ARCHITECTURES
from xllm_compiler.passes import GraphPass, PassManager, PassResult, default_pipeline
from xllm_compiler.testing import build_graph, tiny_config

PROG = "show_graph"
LAYER_WEIGHT = re.compile(r"(?:^|\.)layers\.(\d+)\.")
KV_CACHE = re.compile(r"^kv_cache_(\d+)$")
SHORT_DTYPES = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
}

# --- The graph as text ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeView:
    """One node as the diff and the picture show it, kept apart from the graph the pass edits."""

    name: str
    kind: str  # fx op: placeholder, get_attr, call_function, output
    op: str  # "aten.mul.Tensor", "xllm.fused_add_rms_norm", "getitem"
    label: str  # the op in a box: "mul", "fused_add_rms_norm", "getitem [1]"
    type: str  # "f32[num_tokens, 32]"
    inputs: tuple[str, ...]  # names of the nodes it reads
    layer: int | None
    line: str  # the node in the text form
    shown_as: str  # the node as an argument: a weight by its dotted name, others by their name


class Snapshot(dict[str, NodeView]):
    """A graph's nodes by name, in graph order."""

    def lines(self, layer: int | None = None) -> list[str]:
        return [n.line for n in self.values() if layer is None or n.layer == layer]

    def layer_nodes(self, layer: int) -> list[NodeView]:
        """A layer's computation: its call_function nodes (boxes list the weights and inputs they read)."""
        return [n for n in self.values() if n.kind == "call_function" and n.layer == layer]


def format_type(val: Any, dims: dict) -> str:
    """'f32[num_tokens, 32]' for a tensor, a tuple of those for several results."""
    if isinstance(val, torch.Tensor):
        sizes = [str(s.node.expr.xreplace(dims)) if isinstance(s, torch.SymInt) else str(s) for s in val.shape]
        return f"{SHORT_DTYPES.get(val.dtype, str(val.dtype).removeprefix('torch.'))}[{', '.join(sizes)}]"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(format_type(v, dims) for v in val) + ")"
    if isinstance(val, torch.SymInt):
        return f"int {val.node.expr.xreplace(dims)}"
    return "" if val is None else type(val).__name__


def target_text(target: Any) -> str:
    """'aten.linear' for aten.linear.default; other overloads keep their name ('aten.mul.Tensor')."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target).removesuffix(".default")
    return getattr(target, "__name__", str(target))


def format_arg(arg: Any) -> str:
    if isinstance(arg, fx.Node):
        return str(arg.target) if arg.op == "get_attr" else arg.name
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(format_arg(a) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k!r}: {format_arg(v)}" for k, v in arg.items()) + "}"
    return repr(arg) if isinstance(arg, (str, float)) else str(arg)


def format_line(node: fx.Node, type_: str) -> str:
    if node.op == "placeholder":
        return f"input {node.name}: {type_}"
    if node.op == "get_attr":
        return f"weight {node.target}: {type_}"
    if node.op == "output":
        return f"return {format_arg(node.args[0])}"
    if node.target is operator.getitem:
        call = f"{format_arg(node.args[0])}[{format_arg(node.args[1])}]"
    else:
        args = [format_arg(a) for a in node.args] + [f"{k}={format_arg(v)}" for k, v in node.kwargs.items()]
        call = f"{target_text(node.target)}({', '.join(args)})"
    return f"{node.name}: {type_} = {call}" if type_ else f"{node.name} = {call}"


def assign_layers(nodes: list[fx.Node]) -> dict[fx.Node, int | None]:
    """Each node's decoder layer (the rule is in the module docstring), None outside every layer."""
    own: dict[fx.Node, int] = {}
    for node in nodes:
        if node.op in ("get_attr", "placeholder"):
            match = (LAYER_WEIGHT.search if node.op == "get_attr" else KV_CACHE.match)(str(node.target))
            if match:
                own[node] = int(match.group(1))
        elif node.op == "call_function":
            read = [own[n] for n in node.all_input_nodes if n in own and n.op != "call_function"]
            if read:
                own[node] = min(read)
    layer: dict[fx.Node, int | None] = {}
    for node in reversed(nodes):  # a node's users come after it, so their layers are known
        used_by = [n for u in node.users if (n := layer.get(u)) is not None]
        layer[node] = own.get(node, min(used_by) if used_by else None)
    for node in nodes:
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            layer[node] = layer[node.args[0]]
    return layer


def snapshot(gm: fx.GraphModule) -> Snapshot:
    dims = {expr: sympy.Symbol(name) for name, expr in gm.meta.get("symbols", {}).items()}  # s72 -> num_tokens
    nodes = list(gm.graph.nodes)
    layers = assign_layers(nodes)
    views = Snapshot()
    for node in nodes:
        type_ = format_type(node.meta.get("val"), dims) if node.op != "output" else ""
        op = target_text(node.target) if node.op == "call_function" else node.op
        if node.target is operator.getitem:
            label = f"getitem [{format_arg(node.args[1])}]"
        else:
            label = node.target._opname if isinstance(node.target, torch._ops.OpOverload) else op
        inputs = tuple(n.name for n in node.all_input_nodes)
        line = format_line(node, type_)
        views[node.name] = NodeView(node.name, node.op, op, label, type_, inputs, layers[node], line, format_arg(node))
    return views


# --- Running the pipeline up to a pass -----------------------------------------------------------


@dataclass
class Comparison:
    """A graph before and after one pass."""

    graph_pass: GraphPass
    earlier: list[GraphPass]
    result: PassResult
    before: Snapshot
    after: Snapshot
    description: str  # which graph: architecture or folder, layers, dtype

    def changes(self) -> tuple[set[str], set[str], set[str]]:
        """(removed, added, rewired) node names: only before, only after, in both with a new line."""
        common = self.before.keys() & self.after.keys()
        rewired = {n for n in common if self.before[n].line != self.after[n].line}
        return set(self.before.keys() - common), set(self.after.keys() - common), rewired

    def diff(self, layer: int | None = None, context: int = 3) -> list[str]:
        where = f"{self.graph_pass.name}" + ("" if layer is None else f" (layer {layer})")
        before, after = self.before.lines(layer), self.after.lines(layer)
        return list(difflib.unified_diff(before, after, f"before {where}", f"after {where}", n=context, lineterm=""))

    def op_counts(self) -> tuple[Counter, Counter]:
        before, after = (
            Counter(n.op for n in s.values() if n.kind == "call_function") for s in (self.before, self.after)
        )
        return before, after


def find_pass(name: str) -> tuple[GraphPass, list[GraphPass]]:
    """The pipeline pass called ``name`` and the passes that run before it."""
    pipeline = default_pipeline()
    names = [p.name for p in pipeline]
    if name not in names:
        raise OptionsError(f"unknown pass {name} (known: {', '.join(names)})")
    return pipeline[names.index(name)], pipeline[: names.index(name)]


def load_config(source: str, num_layers: int | None = None) -> tuple[dict[str, Any], str]:
    """(a checked config.json dict, its description) for a checkpoint folder or an architecture name."""
    if source in ARCHITECTURES:
        config, name = tiny_config(source, num_hidden_layers=num_layers or 2), f"tiny {source}"
    elif Path(source).is_dir():
        config, name = read_config(Path(source)), f"{source} (config only, random weights)"
        if num_layers is not None:
            config["num_hidden_layers"] = num_layers
    else:
        known = ", ".join(ARCHITECTURES)
        raise ConfigError(f"{source} is neither a checkpoint folder nor a known architecture ({known})")
    spec_from_config(config)  # refuses what build_graph could not build, before it starts
    return config, name


def compare(config: dict[str, Any], pass_name: str, dtype: torch.dtype = torch.float32, name: str = "") -> Comparison:
    """Build the graph of ``config``, run the pipeline up to ``pass_name``, and that pass."""
    graph_pass, earlier = find_pass(pass_name)
    gm = build_graph(config, dtype)
    PassManager(earlier).run(gm)
    before = snapshot(gm)
    result = graph_pass(gm)
    try:
        gm.graph.lint()
    except Exception as exc:  # lint raises RuntimeError or AssertionError
        raise CompileError(f"pass {pass_name} left an invalid graph: {exc}") from exc
    layers, dtype_name = config["num_hidden_layers"], str(dtype).removeprefix("torch.")
    description = f"{name or config['architectures'][0]}, {layers} layer{'s' * (layers != 1)}, {dtype_name}"
    return Comparison(graph_pass, earlier, result, before, snapshot(gm), description)


def summary(comparison: Comparison) -> list[str]:
    """Pass, graph, PassResult, node count and the op counts that changed."""
    c = comparison
    ops_before, ops_after = c.op_counts()
    before, after = ops_before.total(), ops_after.total()
    lines = [
        f"pass {c.graph_pass.name} v{c.graph_pass.version} on {c.description}",
        f"ran first: {', '.join(p.name for p in c.earlier) or '(nothing)'}",
        repr(c.result),
        f"call_function nodes: {before} -> {after} ({after - before:+d})",
    ]
    changed = sorted(op for op in ops_before | ops_after if ops_before[op] != ops_after[op])
    width = max(map(len, changed), default=0)
    return lines + [f"  {op:<{width}}  {ops_before[op]:>3} -> {ops_after[op]}" for op in changed]


# --- The picture: one layer as boxes and arrows --------------------------------------------------

FONT = "DejaVu Sans Mono, Menlo, Consolas, monospace"
FONT_SIZE, SMALL_SIZE, CHAR_W = 12, 11, 7.2  # CHAR_W: a monospace advance at FONT_SIZE
LINE_H, PAD_X, PAD_Y, GAP_X, GAP_Y, MARGIN = 15, 8, 6, 18, 34, 16
LANE_W = 4  # the room an arrow takes where it passes a row
READS_WIDTH, READS_LINES = 34, 2  # characters and lines for the weights and inputs a box lists
STYLES = {  # status: (fill, stroke, dash, legend)
    "removed": ("#fde0dc", "#c62828", "", "removed"),
    "added": ("#dcf5dd", "#2e7d32", "", "added"),
    "rewired": ("#fff3d6", "#b7791f", "", "rewired"),
    "outside": ("#f2f2f2", "#9e9e9e", "4 3", "from another layer"),
    "same": ("#ffffff", "#555555", "", "unchanged"),
}
EXIT_STROKE = 2.4


@dataclass
class Box:
    """A node of the picture: its text and, once laid out, its top centre and size."""

    name: str
    lines: list[tuple[str, str]]  # (text, kind): kind is "op", "type" or "reads"
    status: str  # a key of STYLES, or "lane" for where an arrow passes a row
    exits: bool = False  # its result is used outside the layer
    title: str = ""
    op: str = ""
    x: float = 0.0
    y: float = 0.0
    w: float = 0.0
    h: float = 0.0


def layer_boxes(snap: Snapshot, layer: int, marked: set[str], mark: str, rewired: set[str]) -> tuple[dict, list]:
    """Boxes and arrows of one layer; nodes in ``marked`` get the status ``mark``."""
    inside = {n.name for n in snap.layer_nodes(layer)}
    exits = {i for n in snap.values() if n.name not in inside for i in n.inputs if i in inside}
    boxes: dict[str, Box] = {}
    edges: list[tuple[str, str]] = []
    for view in snap.layer_nodes(layer):
        reads = []
        for name in view.inputs:
            source = snap[name]
            if source.kind == "get_attr":
                reads.append(".".join(source.shown_as.split(".")[-2:]))  # q_proj.weight
            elif source.kind == "placeholder":
                reads.append(name)
            else:
                if name not in inside and name not in boxes:
                    boxes[name] = Box(name, [(name, "op"), (source.type, "type")], "outside", title=source.line)
                edges.append((name, view.name))
        wrapped = textwrap.wrap(", ".join(reads), READS_WIDTH, break_on_hyphens=False)
        if len(wrapped) > READS_LINES:
            wrapped = [*wrapped[: READS_LINES - 1], wrapped[READS_LINES - 1][: READS_WIDTH - 1] + "…"]
        lines = [(view.label, "op"), (view.type, "type"), *((text, "reads") for text in wrapped)]
        status = mark if view.name in marked else "rewired" if view.name in rewired else "same"
        boxes[view.name] = Box(view.name, lines, status, view.name in exits, view.line, view.op)
    for box in boxes.values():
        named = len(box.lines[0][0]) + 2 + len(box.name) if box.status != "outside" else 0
        box.w = max(named, *(len(text) for text, _ in box.lines)) * CHAR_W + 2 * PAD_X
        box.h = len(box.lines) * LINE_H + 2 * PAD_Y
    return boxes, edges


def layout(boxes: dict[str, Box], edges: list[tuple[str, str]]) -> tuple[list[list[tuple[float, float]]], float, float]:
    """Place the boxes in rows, top to bottom, and route the arrows: (routes, width, height).

    Rows are topological generations, each node then pulled down to just above its first consumer
    (short arrows). An arrow that spans rows passes each row between through a narrow lane, shared by
    the arrows of one source, so that it runs beside the boxes, never under them. Rows are ordered by
    the mean position of each node's neighbours (barycentre sweeps). A route lists its points: the
    source's bottom, then the top and bottom of each lane, then the target's top.
    """
    graph = nx.DiGraph(edges)
    graph.add_nodes_from(boxes)
    rank = {n: i for i, generation in enumerate(nx.topological_generations(graph)) for n in generation}
    for node in reversed(list(nx.topological_sort(graph))):
        if graph.out_degree(node):
            rank[node] = min(rank[s] for s in graph.successors(node)) - 1
    level = {r: i for i, r in enumerate(sorted(set(rank.values())))}
    rows: list[list[str]] = [[] for _ in level]
    for name in boxes:  # graph order to start with
        rows[level[rank[name]]].append(name)
    nodes, lanes, chains = dict(boxes), nx.DiGraph(), []
    for src, dst in edges:
        chain = [src]
        for index in range(level[rank[src]] + 1, level[rank[dst]]):
            lane = f"{src}\0{index}"
            if lane not in nodes:
                nodes[lane] = Box(lane, [], "lane", w=LANE_W)
                rows[index].append(lane)
            chain.append(lane)
        nx.add_path(lanes, [*chain, dst])
        chains.append([*chain, dst])
    for row in rows:
        place(row, nodes, {n: 0.0 for n in row})
    for sweep in range(6):  # alternately from parents (downwards) and from children (upwards)
        down = sweep % 2 == 0
        for row in rows[1:] if down else reversed(rows[:-1]):
            near = {n: list(lanes.predecessors(n) if down else lanes.successors(n)) if n in lanes else [] for n in row}
            want = {n: sum(nodes[m].x for m in near[n]) / len(near[n]) if near[n] else nodes[n].x for n in row}
            row.sort(key=want.__getitem__)
            place(row, nodes, want)
    left, y = min(b.x - b.w / 2 for b in nodes.values()), float(MARGIN)
    for row in rows:
        height = max(nodes[n].h for n in row)
        for n in row:
            nodes[n].x += MARGIN - left
            nodes[n].y = y
            if nodes[n].status == "lane":
                nodes[n].h = height
        y += height + GAP_Y
    routes = []
    for first, *between, last in ([nodes[n] for n in chain] for chain in chains):
        points = [(first.x, first.y + first.h)]
        for passing in between:
            points += [(passing.x, passing.y), (passing.x, passing.y + passing.h)]
        routes.append([*points, (last.x, last.y)])
    return routes, max(b.x + b.w / 2 for b in nodes.values()) + MARGIN, y - GAP_Y + MARGIN


def place(row: list[str], nodes: dict[str, Box], want: dict[str, float]) -> None:
    """Centre each box of the row as near ``want`` as the row's order and spacing allow."""
    xs: list[float] = []
    for i, name in enumerate(row):
        gap = (nodes[row[i - 1]].w + nodes[name].w) / 2 + GAP_X if i else 0
        xs.append(max(want[name], xs[-1] + gap) if i else want[name])
    shift = sum(want[n] - x for n, x in zip(row, xs, strict=True)) / len(row)
    for name, x in zip(row, xs, strict=True):
        nodes[name].x = x + shift


def render_svg(boxes: dict[str, Box], edges: list[tuple[str, str]], ident: str) -> tuple[str, float, float]:
    """(<svg> element, width, height); ``ident`` keeps its ids unique in a page with several."""
    if not boxes:
        return _svg('<text x="16" y="24" font-size="13">(no nodes in this layer)</text>', 260, 40, ident), 260, 40
    routes, width, height = layout(boxes, edges)
    parts = [
        f'<defs><marker id="{ident}-arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555555"/></marker></defs>'
    ]
    arriving: dict[str, list[list[tuple[float, float]]]] = {}
    for (_, dst), points in zip(edges, routes, strict=True):
        arriving.setdefault(dst, []).append(points)
    for dst, routes_in in arriving.items():  # arrows enter spread along the top edge, left to right
        target = boxes[dst]
        for i, points in enumerate(sorted(routes_in, key=lambda points: points[-2][0])):
            points[-1] = (target.x + target.w * 0.6 * ((i + 1) / (len(routes_in) + 1) - 0.5), target.y)
            parts.append(
                f'<path d="{_route(points)}" fill="none" stroke="#777777" stroke-width="1.2" '
                f'marker-end="url(#{ident}-arrow)"/>'
            )
    parts += [_box(box) for box in boxes.values()]
    return _svg("\n".join(parts), width, height, ident), width, height


def _route(points: list[tuple[float, float]]) -> str:
    """Curves between rows (leaving and entering vertically), straight lines through lanes."""
    (x, y), *rest = points
    path = [f"M{x:.1f},{y:.1f}"]
    for i, (x2, y2) in enumerate(rest):
        bend = (y2 - y) / 2
        curve = f"C{x:.1f},{y + bend:.1f} {x2:.1f},{y2 - bend:.1f} {x2:.1f},{y2:.1f}"
        path.append(f"L{x2:.1f},{y2:.1f}" if i % 2 else curve)
        x, y = x2, y2
    return " ".join(path)


def _box(box: Box) -> str:
    fill, stroke, dash, _ = STYLES[box.status]
    left, top, esc = box.x - box.w / 2, box.y, html.escape
    dashes = f' stroke-dasharray="{dash}"' if dash else ""
    out = [
        f'<g class="node" data-name="{esc(box.name)}" data-op="{esc(box.op)}"><title>{esc(box.title)}</title>',
        f'<rect x="{left:.1f}" y="{top:.1f}" width="{box.w:.1f}" height="{box.h:.1f}" rx="4" fill="{fill}" '
        f'stroke="{stroke}" stroke-width="{EXIT_STROKE if box.exits else 1}"{dashes}/>',
    ]
    for i, (text, kind) in enumerate(box.lines):
        y = top + PAD_Y + (i + 1) * LINE_H - 4
        bold = ' font-weight="bold"' if kind == "op" and box.status != "outside" else ""
        color, size = {"op": ("#111111", FONT_SIZE), "type": ("#333333", FONT_SIZE), "reads": ("#6a6a6a", SMALL_SIZE)}[
            kind
        ]
        out.append(
            f'<text x="{left + PAD_X:.1f}" y="{y:.1f}" font-size="{size}" fill="{color}"{bold}>{esc(text)}</text>'
        )
        if i == 0 and box.status != "outside":
            out.append(
                f'<text x="{left + box.w - PAD_X:.1f}" y="{y:.1f}" font-size="{SMALL_SIZE}" fill="#777777" '
                f'text-anchor="end">{esc(box.name)}</text>'
            )
    return "\n".join([*out, "</g>"])


def _svg(body: str, width: float, height: float, ident: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" id="{ident}" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.1f} {height:.1f}" font-family="{FONT}">\n{body}\n</svg>'
    )


def pictures(comparison: Comparison, layer: int) -> tuple[tuple[str, float, float], tuple[str, float, float]]:
    """(svg, width, height) of the layer before and after the pass."""
    removed, added, rewired = comparison.changes()
    before = layer_boxes(comparison.before, layer, removed, "removed", rewired)
    after = layer_boxes(comparison.after, layer, added, "added", rewired)
    return render_svg(*before, "before"), render_svg(*after, "after")


def legend(x: float, y: float) -> str:
    parts = []
    keys = [(k, 1) for k in ("removed", "added", "rewired", "outside")] + [("same", EXIT_STROKE)]
    for status, stroke_width in keys:
        fill, stroke, dash, text = STYLES[status]
        text = "result used outside the layer" if stroke_width != 1 else text
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(
            f'<rect x="{x:.0f}" y="{y - 10:.0f}" width="14" height="12" fill="{fill}" stroke="{stroke}" '
            f'stroke-width="{stroke_width}"{dashes}/>'
            f'<text x="{x + 20:.0f}" y="{y:.0f}" font-size="12">{html.escape(text)}</text>'
        )
        x += 32 + CHAR_W * len(text)
    return "\n".join(parts)


def combined_svg(comparison: Comparison, layer: int) -> str:
    """The layer before (left) and after (right) in one SVG, under a title and a legend."""
    (before, bw, bh), (after, aw, ah) = pictures(comparison, layer)
    nb, na = len(comparison.before.layer_nodes(layer)), len(comparison.after.layer_nodes(layer))
    title = f"{comparison.graph_pass.name}: {comparison.result.matches} matches; layer {layer}: {nb} -> {na} nodes"
    top, split = 74, bw + MARGIN * 2
    body = [
        f'<text x="{MARGIN}" y="22" font-size="15" font-weight="bold">{html.escape(title)}</text>',
        legend(MARGIN, 44),
        f'<text x="{MARGIN}" y="{top - 6}" font-size="13" font-weight="bold">before</text>',
        f'<text x="{split + MARGIN}" y="{top - 6}" font-size="13" font-weight="bold">after</text>',
        f'<line x1="{split:.1f}" y1="{top - 20}" x2="{split:.1f}" y2="{top + max(bh, ah)}" stroke="#cccccc"/>',
        before.replace("<svg ", f'<svg x="{MARGIN}" y="{top}" ', 1),
        after.replace("<svg ", f'<svg x="{split + MARGIN:.1f}" y="{top}" ', 1),
    ]
    return _svg("\n".join(body), max(split + aw + MARGIN * 2, 900), top + max(bh, ah) + MARGIN, "show-graph") + "\n"


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 16px; color: #222; }}
pre {{ font-family: {font}; font-size: 12px; background: #fafafa; border: 1px solid #ddd; padding: 8px;
      overflow-x: auto; }}
.panels {{ display: flex; gap: 24px; align-items: flex-start; overflow-x: auto; }}
figure {{ margin: 0; border: 1px solid #ddd; }}
figcaption {{ font-weight: bold; padding: 4px 8px; background: #f4f4f4; }}
.add {{ color: #1b5e20; background: #e8f5e9; }} .del {{ color: #b71c1c; background: #fdecea; }}
.hunk {{ color: #1a4f8b; }}
</style></head><body>
<h1>{title}</h1>
<pre>{summary}</pre>
<svg xmlns="http://www.w3.org/2000/svg" width="900" height="20" font-family="{font}">{legend}</svg>
<div class="panels">
<figure><figcaption>before: layer {layer}, {nb} nodes</figcaption>
{before}
</figure>
<figure><figcaption>after: layer {layer}, {na} nodes</figcaption>
{after}
</figure>
</div>
<h2>Diff{where}</h2>
<pre>{diff}</pre>
</body></html>
"""


def render_html(comparison: Comparison, layer: int, diff: Sequence[str], where: str = "") -> str:
    """One self-contained page: summary, the layer before and after, and the diff."""
    (before, _, _), (after, _, _) = pictures(comparison, layer)
    rows = []
    for line in diff:
        kind = "hunk" if line.startswith("@@") else {"+": "add", "-": "del"}.get(line[:1], "")
        rows.append(f'<span class="{kind}">{html.escape(line)}</span>' if kind else html.escape(line))
    return PAGE.format(
        title=html.escape(f"{comparison.graph_pass.name} on {comparison.description}"),
        font=FONT,
        summary=html.escape("\n".join(summary(comparison))),
        legend=legend(4, 15),
        layer=layer,
        nb=len(comparison.before.layer_nodes(layer)),
        na=len(comparison.after.layer_nodes(layer)),
        before=before,
        after=after,
        where=html.escape(where),
        diff="\n".join(rows) or "(no change)",
    )


# --- Command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", metavar="MODEL_DIR_OR_ARCH", help="checkpoint folder or architecture")
    parser.add_argument("--pass", dest="pass_name", metavar="NAME", help="the pass to show (see --list)")
    parser.add_argument("--list", action="store_true", help="print the pipeline's passes in order and exit")
    parser.add_argument("--layer", type=int, metavar="N", help="restrict the diff and the picture to decoder layer N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the traced model")
    parser.add_argument("--num-layers", type=int, metavar="N", help="decoder layers to build (default: 2, or config's)")
    parser.add_argument("--context", type=int, default=3, metavar="N", help="lines of context in the diff (default 3)")
    parser.add_argument("--svg", type=Path, metavar="PATH", help="write the layer before and after as one SVG")
    parser.add_argument("--html", type=Path, metavar="PATH", help="write summary, pictures and diff as one page")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(p.name for p in default_pipeline()))
        return EXIT_OK
    if not args.source or not args.pass_name:
        parser.error("MODEL_DIR_OR_ARCH and --pass are required (or --list)")

    def body() -> int:
        if args.num_layers is not None and args.num_layers < 1:
            raise OptionsError(f"--num-layers must be at least 1, not {args.num_layers}")
        find_pass(args.pass_name)
        config, name = load_config(args.source, args.num_layers)
        layer, layers = args.layer or 0, config["num_hidden_layers"]
        if not 0 <= layer < layers:
            raise OptionsError(f"--layer {layer} is out of range: the model has {layers} layers")
        comparison = compare(config, args.pass_name, DTYPES[args.dtype], name)
        diff = comparison.diff(args.layer, args.context)
        where = "" if args.layer is None else f" (layer {args.layer})"
        print("\n".join(summary(comparison)))
        print("\n".join(diff) if diff else f"(the graph{where} is unchanged)")
        if args.svg:
            write(args.svg, combined_svg(comparison, layer))
        if args.html:
            write(args.html, render_html(comparison, layer, diff, where))
        return EXIT_OK

    return guarded(PROG, body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
