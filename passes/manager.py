"""The pass pipeline, and the PassManager that runs it and records what every pass did.

The pipeline is one ordered list, the same on every platform (the platform only decides how the
``xllm::`` ops a fusion produces are lowered). Each pass is timed, its node counts and matches are
recorded, and the graph is linted after it, so a broken rewrite fails at the pass that made it. A
pass that raises fails the compile with a CompileError naming it, its version, the node it was on
and (with --debug-dump) the file holding the graph it was given.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import fx

from xllm_compiler.errors import CompileError, InputError, OptionsError, XllmError
from xllm_compiler.passes.cleanup.eliminate_common_subexpressions import eliminate_common_subexpressions
from xllm_compiler.passes.cleanup.eliminate_dead_code import eliminate_dead_code
from xllm_compiler.passes.cleanup.fold_constants import fold_constants
from xllm_compiler.passes.cleanup.remove_noop_ops import remove_noop_ops
from xllm_compiler.passes.comm.fuse_all_reduce_add_rms_norm import fuse_all_reduce_add_rms_norm
from xllm_compiler.passes.comm.reorder_collectives import reorder_collectives
from xllm_compiler.passes.comm.split_micro_batches import MicroBatchOptions, SplitMicroBatches, split_micro_batches
from xllm_compiler.passes.fusion.absorb_mla_weights import absorb_mla_weights
from xllm_compiler.passes.fusion.fuse_add_rms_norm import fuse_add_rms_norm
from xllm_compiler.passes.fusion.fuse_moe import fuse_moe
from xllm_compiler.passes.fusion.fuse_rms_norm import fuse_rms_norm
from xllm_compiler.passes.fusion.fuse_rotary_embedding import fuse_rotary_embedding
from xllm_compiler.passes.fusion.fuse_silu_and_mul import fuse_silu_and_mul
from xllm_compiler.passes.fusion.merge_gate_up_projections import merge_gate_up_projections
from xllm_compiler.passes.fusion.merge_qkv_projections import merge_qkv_projections
from xllm_compiler.passes.fusion.select_rows_before_final_norm import select_rows_before_final_norm
from xllm_compiler.passes.graph_pass import GraphPass
from xllm_compiler.passes.memory.plan_memory import PlanMemory, PlanMemoryOptions, plan_memory
from xllm_compiler.passes.quant.quantize_linear_weights import (
    QuantizeLinearWeights,
    QuantizeOptions,
    quantize_linear_weights,
)


def default_pipeline(quantize: QuantizeOptions | None = None) -> list[GraphPass]:
    """Every pass, in the order it runs (``quantize``: the weight quantization asked for; none by default)."""
    return [
        # Cleanup: make the traced graph canonical, so that the patterns below see one form.
        remove_noop_ops,
        eliminate_common_subexpressions,
        eliminate_dead_code,
        # Merge projections that read the same input into one matmul each.
        merge_qkv_projections,
        merge_gate_up_projections,
        # Evaluate weight-only subgraphs (the merged weights) once, into stored weights.
        fold_constants,
        # Quantize the (merged) linear weights, when asked: linears become xllm::linear_w8 or xllm::linear_w4.
        quantize_linear_weights if quantize is None else QuantizeLinearWeights(quantize),
        # Fuse elementwise chains into xllm:: ops (residual+norm before plain norm: it is the larger).
        fuse_add_rms_norm,
        fuse_rms_norm,
        fuse_silu_and_mul,
        fuse_rotary_embedding,
        # MoE layers: router softmax + top-k and the routed experts into one op.
        fuse_moe,
        # Work only on the rows that reach the LM head.
        select_rows_before_final_norm,
    ]


def bucket_pipeline(
    micro_batches: MicroBatchOptions | None = None, memory: PlanMemoryOptions | None = None
) -> list[GraphPass]:
    """Passes run on each bucket's specialised graph, where every size is known (``memory``: the target
    platform's out forms, from its lowering table)."""
    return [
        # MLA models: decode attends over the latent cache, kv_b_proj folded into the query and output.
        absorb_mla_weights,
        # Tensor-parallel graphs: two interleaved micro-batches, so one half's all-reduce is in flight
        # while the other half computes; collectives issued early and awaited late; what stays exposed
        # fused with the residual add and norm after it.
        split_micro_batches if micro_batches is None else SplitMicroBatches(micro_batches),
        reorder_collectives,
        fuse_all_reduce_add_rms_norm,
        # Place every intermediate in one arena, and make ops write there.
        plan_memory if memory is None else PlanMemory(memory),
    ]


def select_passes(
    names: Sequence[str] | None, disabled: Sequence[str] = (), pipeline: list[GraphPass] | None = None
) -> list[GraphPass]:
    """``pipeline`` (default: the graph pipeline) restricted to ``names`` (None: all; ["none"] or []:
    nothing) minus ``disabled``. Names may come from either pipeline; order follows the pipeline."""
    pipeline = default_pipeline() if pipeline is None else pipeline
    known = {p.name for p in default_pipeline() + bucket_pipeline()}
    requested = set(known) if names is None else {n for n in names if n != "none"}
    unknown = (requested | set(disabled)) - known
    if unknown:
        raise OptionsError(f"unknown pass {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    return [p for p in pipeline if p.name in requested and p.name not in disabled]


@dataclass(frozen=True)
class PassRecord:
    """One pass's entry in report.json."""

    name: str
    version: int
    seconds: float
    nodes_before: int
    nodes_after: int
    matches: int

    def to_json(self) -> dict:
        return asdict(self)


def count_nodes(gm: fx.GraphModule) -> int:
    return sum(1 for node in gm.graph.nodes if node.op == "call_function")


def failing_node(exc: BaseException, graph: fx.Graph) -> fx.Node | None:
    """The node of ``graph`` a pass was working on when it raised ``exc``: from the innermost frame of
    the traceback that holds one, a local named ``node`` first (the loop variable of most passes)."""
    for frame, _ in reversed(list(traceback.walk_tb(exc.__traceback__))):
        candidates = [frame.f_locals.get("node"), *frame.f_locals.values()]
        for value in candidates:
            if isinstance(value, fx.Node) and value.graph is graph:
                return value
    return None


def _target_name(node: fx.Node) -> str:
    if isinstance(node.target, (str, torch._ops.OpOverload)):
        return str(node.target)
    return getattr(node.target, "__name__", repr(node.target))


def pass_failure(
    graph_pass: GraphPass, what: str, exc: BaseException, node: fx.Node | None, graph_file: Path | None
) -> CompileError:
    """One line: which pass (and version) failed how, on which node, with which graph as input."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if not isinstance(exc, XllmError):
        detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    where = f" at node {node.name} ({_target_name(node)})" if node is not None else ""
    return CompileError(f"pass {graph_pass.name} v{graph_pass.version} {what}{where}: {detail}{_given(graph_file)}")


def _given(graph_file: Path | None) -> str:
    return f" (the graph it was given: {graph_file})" if graph_file is not None else ""


class PassManager:
    """Runs passes in order over one GraphModule, then regenerates its code (passes edit the graph
    only; recompiling after each would cost more than most passes).

    ``check`` (optional) runs after every pass (e.g. --verify's NumericsCheck); ``dump_dir`` (optional)
    receives the graph's code before the first pass and after each one, for --debug-dump.

    Whatever a pass raises becomes a CompileError naming the pass (the original chained as its
    cause), except an InputError: bad input the user can fix stays what it is.
    """

    def __init__(
        self,
        passes: Sequence[GraphPass],
        check: Callable[[GraphPass, fx.GraphModule], None] | None = None,
        dump_dir: Path | None = None,
    ):
        self.passes = list(passes)
        self.check = check
        self.dump_dir = dump_dir

    def _dump(self, index: int, name: str, gm: fx.GraphModule) -> Path | None:
        if self.dump_dir is None:
            return None
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        path = self.dump_dir / f"{index:02d}_{name}.py"
        path.write_text(gm.print_readable(print_output=False))
        return path

    def run(self, gm: fx.GraphModule) -> list[PassRecord]:
        records = []
        given = self._dump(0, "captured", gm)  # each dump is the next pass's input
        for index, graph_pass in enumerate(self.passes, start=1):
            before = count_nodes(gm)
            start = time.perf_counter()
            try:
                result = graph_pass(gm)
            except InputError:
                raise
            except Exception as exc:
                raise pass_failure(graph_pass, "failed", exc, failing_node(exc, gm.graph), given) from exc
            seconds = time.perf_counter() - start
            try:
                gm.graph.lint()
            except Exception as exc:  # lint raises RuntimeError or AssertionError
                raise pass_failure(graph_pass, "left an invalid graph", exc, None, given) from exc
            if self.check is not None:
                gm.recompile()
                try:
                    self.check(graph_pass, gm)
                except CompileError as exc:  # the check's verdict names the pass; add where its input is
                    raise CompileError(f"{exc}{_given(given)}") from exc
                except InputError:
                    raise
                except Exception as exc:  # e.g. the rewritten graph does not run
                    raise pass_failure(graph_pass, "failed its check", exc, None, given) from exc
            given = self._dump(index, graph_pass.name, gm)
            records.append(
                PassRecord(
                    graph_pass.name, graph_pass.version, round(seconds, 6), before, count_nodes(gm), result.matches
                )
            )
        gm.recompile()
        return records
