"""Pick next tokens from logits: greedy at temperature 0, else temperature + nucleus (top-p) sampling, per row."""

from __future__ import annotations

import torch

from xllm_compiler.ops.native import native_kernels


def probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """What sampling draws from, per row of ``logits`` [n, vocab]: softmax at ``temperature`` (> 0), cut to the
    nucleus of mass ``top_p`` and renormalised (the speculative rejection rule compares probabilities)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs /= probs.sum(dim=-1, keepdim=True)
    return probs


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """The argmax of each row of ``logits`` [n, vocab]: by the native kernel for float32 on the CPU (ATen's
    argmax is a scalar loop, 35-45 us a row of a 32000-token vocabulary: a tenth of what a batch-1 decode
    step spends outside its graph), else by torch. Both give the first index of the largest value."""
    native = native_kernels() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    return native.argmax_rows(logits) if native is not None else logits.argmax(dim=-1).tolist()


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> list[int]:
    """One token per row of ``logits`` [n, vocab] (float32, on CPU)."""
    if temperature == 0.0:
        return greedy_tokens(logits)
    probs = probabilities(logits, temperature, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).tolist()


def sample_rows(logits: torch.Tensor, params: list[tuple[float, float, torch.Generator | None]]) -> list[int]:
    """One token per row of ``logits`` [n, vocab], row i by its own (temperature, top_p, generator).

    Greedy rows cost one argmax for all of them. A row with a generator of its own samples alone, so what it
    draws depends on nothing else in the batch; rows without one share a draw per (temperature, top_p).
    """
    tokens = greedy_tokens(logits)
    shared: dict[tuple[float, float], list[int]] = {}
    for row, (temperature, top_p, generator) in enumerate(params):
        if temperature == 0.0:
            continue
        if generator is not None:
            tokens[row] = sample(logits[row : row + 1], temperature, top_p, generator)[0]
        else:
            shared.setdefault((temperature, top_p), []).append(row)
    for (temperature, top_p), rows in shared.items():
        picked = logits.index_select(0, torch.tensor(rows))  # (list indexing is slow on one-row tensors)
        for row, token in zip(rows, sample(picked, temperature, top_p, None), strict=True):
            tokens[row] = token
    return tokens
