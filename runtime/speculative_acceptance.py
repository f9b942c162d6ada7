"""Which proposed tokens a verify step keeps, so that speculation never changes what the target model says.

A verify step scores a sequence's last token and its ``k`` proposals in one go: row ``i`` of the target's
logits is its distribution for the token after proposal ``i`` (row 0: after the last real token). Both rules
return the kept proposals followed by one token of the target's own, so every verify step makes progress:

- greedy: keep proposals while each equals the target's argmax; then take the argmax (a bonus token when all
  ``k`` were kept). The output is token for token what plain greedy decoding writes.
- sampled: the standard rejection rule (Leviathan et al., 2023; Chen et al., 2023). Proposal ``d`` with draft
  probability ``q(d)`` is kept with probability ``min(1, p(d) / q(d))``; on the first rejection the token is
  drawn from ``max(0, p - q)`` renormalised. The tokens written are then distributed exactly as the target's
  own samples. An n-gram proposal is a point mass (``q(d) = 1``): kept with probability ``p(d)``, and the
  residual is ``p`` without ``d``.
"""

from __future__ import annotations

import torch

from xllm_compiler.runtime.sampling import greedy_tokens


def accept_greedy(proposals: list[int], target_logits: torch.Tensor) -> list[int]:
    """Kept proposals plus the target's next token; ``target_logits`` is [len(proposals) + 1, vocab]."""
    best = greedy_tokens(target_logits)
    kept = 0
    while kept < len(proposals) and proposals[kept] == best[kept]:
        kept += 1
    return [*proposals[:kept], best[kept]]


def accept_sampled(
    proposals: list[int],
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None,
) -> list[int]:
    """Kept proposals plus one drawn token, by the rejection rule.

    ``target_probs`` [k + 1, vocab] are the target's (temperature and top-p applied) probabilities per row;
    ``draft_probs`` [k, vocab] the proposer's, or None for point-mass proposals (n-gram lookup).
    """
    for i, token in enumerate(proposals):
        p = target_probs[i]
        q_token = 1.0 if draft_probs is None else float(draft_probs[i, token])
        if float(torch.rand((), generator=generator)) * q_token < float(p[token]):
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[token] = 0.0
        else:
            residual = (p - draft_probs[i]).clamp_(min=0.0)
        if float(residual.sum()) <= 0.0:  # p is (numerically) q itself: any draw from p is exact
            residual = p
        return [*proposals[:i], int(torch.multinomial(residual, 1, generator=generator))]
    return [*proposals, int(torch.multinomial(target_probs[len(proposals)], 1, generator=generator))]
