"""Prompt-lookup proposals and the acceptance rules: greedy keeps the target's argmax path, sampling keeps its
distribution (checked by total variation over many seeded draws)."""

from __future__ import annotations

import pytest
import torch

from xllm_compiler.runtime.ngram_proposer import NgramProposer
from xllm_compiler.runtime.speculative_acceptance import accept_greedy, accept_sampled


def test_longest_ngram_wins_and_its_latest_match():
    proposer = NgramProposer(num_tokens=3, min_n=1, max_n=3)
    # "7 8 9" occurred once followed by 1 2 3; "9" alone occurred later followed by 5.
    tokens = [7, 8, 9, 1, 2, 3, 9, 5, 6, 7, 8, 9]
    assert proposer.propose(tokens) == [1, 2, 3]
    assert NgramProposer(num_tokens=2, min_n=1, max_n=1).propose(tokens) == [5, 6]


def test_proposals_stop_at_the_history_end_and_at_the_limit():
    proposer = NgramProposer(num_tokens=4, min_n=2, max_n=2)
    assert proposer.propose([1, 2, 3, 1, 2]) == [3, 1, 2]  # the continuation runs into the pattern itself
    assert proposer.propose([1, 2, 3, 1, 2], limit=1) == [3]
    assert proposer.propose([1, 2, 3, 1, 2], limit=0) == []


def test_no_match_no_proposal():
    proposer = NgramProposer(num_tokens=3, min_n=2, max_n=4)
    assert proposer.propose([1, 2, 3, 4, 5]) == []
    assert proposer.propose([1]) == []


@pytest.mark.parametrize(("min_n", "max_n", "count"), [(0, 2, 1), (3, 2, 1), (1, 2, 0)])
def test_bad_sizes_are_refused(min_n, max_n, count):
    with pytest.raises(ValueError):
        NgramProposer(num_tokens=count, min_n=min_n, max_n=max_n)


def _logits_with_argmax(tokens: list[int], vocab: int = 6) -> torch.Tensor:
    logits = torch.zeros(len(tokens), vocab)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
    return logits


def test_greedy_keeps_the_matching_prefix_then_the_targets_token():
    assert accept_greedy([3, 4, 5], _logits_with_argmax([3, 4, 1, 2])) == [3, 4, 1]
    assert accept_greedy([3, 4, 5], _logits_with_argmax([3, 4, 5, 2])) == [3, 4, 5, 2]  # all kept: a bonus token
    assert accept_greedy([3], _logits_with_argmax([0, 2])) == [0]
    assert accept_greedy([], _logits_with_argmax([4])) == [4]


def _total_variation(samples: list[int], probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(samples), minlength=probs.numel()).double()
    return 0.5 * float((counts / counts.sum() - probs.double()).abs().sum())


DRAWS = 20_000  # total variation of this many draws from the right distribution is ~0.01 over 6 outcomes


@pytest.mark.parametrize("proposer", ["point_mass", "draft_distribution"])
def test_sampled_first_token_has_the_targets_distribution(proposer):
    generator = torch.Generator().manual_seed(0)
    vocab = 6
    target = torch.softmax(torch.randn(2, vocab, generator=generator), dim=-1)
    draft = torch.softmax(torch.randn(1, vocab, generator=generator) * 2, dim=-1)
    firsts = []
    for _ in range(DRAWS):
        if proposer == "point_mass":
            proposal, draft_probs = [2], None  # a fixed guess, as an n-gram lookup makes
        else:
            proposal, draft_probs = [int(torch.multinomial(draft[0], 1, generator=generator))], draft
        firsts.append(accept_sampled(proposal, target, draft_probs, generator)[0])
    assert _total_variation(firsts, target[0]) < 0.02


def test_sampled_keeps_everything_the_target_is_sure_of():
    sure = torch.zeros(3, 4)
    sure[0, 1] = sure[1, 2] = sure[2, 3] = 1.0
    assert accept_sampled([1, 2], sure, None, torch.Generator().manual_seed(0)) == [1, 2, 3]
