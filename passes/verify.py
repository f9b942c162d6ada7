"""--verify: run the graph on sample inputs after every pass and fail the pass that changed results.

The samples are two real steps through the paged KV cache (a prefill of two prompts, then a decode
step that reads what the prefill wrote), so attention, padding-free metadata and the cache all take
part. Each pass is compared with the graph before it, which names the culprit exactly; the tolerance
is relative to the largest logit (float32 1e-4; 16-bit floats 2e-2, a few eps of bf16). A failure
says where the largest difference is (which step, which logit) and how large, absolute and relative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from xllm_compiler.errors import CompileError
from xllm_compiler.interface import STEP_INPUTS
from xllm_compiler.passes.graph_pass import GraphPass

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-2}
PROMPT_LENGTHS = (3, 4)
STEP_NAMES = ("prefill", "decode")  # the steps sample_steps returns, in order


def _kv_placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("kv_cache_")]


def sample_steps(gm: fx.GraphModule, seed: int = 0) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
    """Inputs of a prefill step and a decode step, and fresh KV caches for them."""
    kv = _kv_placeholders(gm)
    planes, _, block_size, kv_heads, head_dim = kv[0].meta["val"].shape
    block_size = int(block_size)
    longest = max(PROMPT_LENGTHS) + 1
    per_seq = -(-longest // block_size)
    blocks = [[1 + s * per_seq + b for b in range(per_seq)] for s in range(len(PROMPT_LENGTHS))]
    num_blocks = 1 + per_seq * len(PROMPT_LENGTHS)
    generator = torch.Generator().manual_seed(seed)

    def step(starts: list[int], counts: list[int]) -> dict[str, torch.Tensor]:
        positions = [p for start, n in zip(starts, counts, strict=True) for p in range(start, start + n)]
        owners = [s for s, n in enumerate(counts) for _ in range(n)]
        slots = [
            blocks[s][p // block_size] * block_size + p % block_size for s, p in zip(owners, positions, strict=True)
        ]
        ends = torch.tensor(counts).cumsum(0) - 1
        return {
            "input_ids": torch.randint(0, 8, (len(positions),), generator=generator),
            "positions": torch.tensor(positions),
            "slot_mapping": torch.tensor(slots),
            "query_lens": torch.tensor(counts, dtype=torch.int32),
            "seq_lens": torch.tensor([s + n for s, n in zip(starts, counts, strict=True)], dtype=torch.int32),
            "block_tables": torch.tensor(blocks, dtype=torch.int32),
            "logits_indices": ends,
        }

    prefill = step([0] * len(PROMPT_LENGTHS), list(PROMPT_LENGTHS))
    decode = step(list(PROMPT_LENGTHS), [1] * len(PROMPT_LENGTHS))
    caches = [
        torch.zeros(int(planes), num_blocks, block_size, int(kv_heads), int(head_dim), dtype=n.meta["val"].dtype)
        for n in kv
    ]
    return [prefill, decode], caches


def run_steps(
    gm: fx.GraphModule, steps: list[dict[str, torch.Tensor]], caches: list[torch.Tensor]
) -> list[torch.Tensor]:
    """The graph's outputs for each step, on copies of ``caches`` (which stay untouched)."""
    caches = [c.clone() for c in caches]
    outputs = []
    with torch.inference_mode():
        for step in steps:
            result = gm(*(step[s.name] for s in STEP_INPUTS), *caches)
            outputs.append(result[0].float())
    return outputs


def relative_error(result: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The largest difference over all outputs, relative to the largest magnitude of its reference."""
    return largest_difference(result, reference).relative


@dataclass(frozen=True)
class Difference:
    """Where two runs differ most: output ``output`` (one per step), element ``index`` ([sequence, token
    id] of the logits), by how much."""

    output: int
    index: tuple[int, ...]
    absolute: float
    relative: float  # to the largest magnitude of that output's reference

    def describe(self, names: tuple[str, ...] = STEP_NAMES) -> str:
        step = names[self.output] if self.output < len(names) else f"output {self.output}"
        where = f"element {list(self.index)}"
        if len(self.index) == 2:
            where = f"logit {self.index[1]} of sequence {self.index[0]}"
        return f"in the {step} step, {where} moved by {self.absolute:.3g} ({self.relative:.3g} of the largest logit)"


def largest_difference(result: list[torch.Tensor], reference: list[torch.Tensor]) -> Difference:
    """The element, over every output, whose difference relative to its output's largest value is the largest
    (NaN counts as infinitely large)."""
    worst: Difference | None = None
    for output, (r, e) in enumerate(zip(result, reference, strict=True)):
        difference = (r - e).abs().nan_to_num(nan=float("inf"))
        flat = int(difference.argmax())
        absolute = difference.flatten()[flat].item()
        relative = absolute / max(e.abs().max().item(), 1e-12)
        if worst is None or relative > worst.relative:
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), difference.shape))
            worst = Difference(output, index, absolute, relative)
    if worst is None:
        raise ValueError("no outputs to compare")
    return worst


class NumericsCheck:
    """A PassManager check: compares every pass's graph with the one before it on sample steps."""

    def __init__(self, gm: fx.GraphModule, dtype: torch.dtype):
        self.steps, self.caches = sample_steps(gm)
        self.tolerance = TOLERANCE[dtype]
        self.last = run_steps(gm, self.steps, self.caches)
        self.errors: dict[str, float] = {}

    def __call__(self, graph_pass: GraphPass, gm: fx.GraphModule) -> None:
        outputs = run_steps(gm, self.steps, self.caches)
        difference = largest_difference(outputs, self.last)
        self.errors[graph_pass.name] = difference.relative
        if not difference.relative <= self.tolerance:
            raise CompileError(
                f"pass {graph_pass.name} v{graph_pass.version} changed the graph's results (--verify): "
                f"{difference.describe()}, over the tolerance {self.tolerance:g}"
            )
        self.last = outputs
