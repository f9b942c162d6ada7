"""runtime/platform/huge_pages.py: the CPU's weights moved into one 2 MiB-aligned block, equal and in place."""

from __future__ import annotations

import mmap

import pytest
import torch

from xllm_compiler.runtime.platform.huge_pages import HUGE_PAGE, place_in_huge_pages

pytestmark = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE on this platform")


def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "packed": torch.randint(0, 255, (700, 3001), dtype=torch.uint8),
        "linear": torch.randn(1000, 768).to(torch.bfloat16),
        "norm": torch.randn(768),
        "scalar": torch.tensor(3, dtype=torch.int64),
    }


def test_tensors_move_into_one_aligned_block_with_their_values():
    tensors = weights()
    before = {name: t.clone() for name, t in tensors.items()}
    placed = place_in_huge_pages(tensors)
    assert placed >= sum(t.nbytes for t in before.values())
    pointers = sorted(t.data_ptr() for t in tensors.values())
    assert pointers[0] % HUGE_PAGE == 0 and all(p % 64 == 0 for p in pointers)
    for name, t in tensors.items():
        assert t.dtype == before[name].dtype and t.shape == before[name].shape and torch.equal(t, before[name])
    tensors["norm"].add_(1)  # each its own bytes: writing one leaves the rest alone
    assert torch.equal(tensors["linear"], before["linear"]) and torch.equal(tensors["norm"], before["norm"] + 1)


def test_views_and_shared_storages_stay_where_they_are():
    base = torch.randn(4096, 512)
    tensors = {"whole": torch.randn(2048, 512), "half": base[:2048], "alias": base, "alias_too": base.view(-1)}
    kept = {name: tensors[name].data_ptr() for name in ("half", "alias", "alias_too")}
    place_in_huge_pages(tensors)
    assert {name: tensors[name].data_ptr() for name in kept} == kept


def test_off_switch_and_small_sets_place_nothing(monkeypatch):
    tensors = weights()
    pointers = {name: t.data_ptr() for name, t in tensors.items()}
    monkeypatch.setenv("XLLM_HUGE_PAGES", "0")
    assert place_in_huge_pages(tensors) == 0
    monkeypatch.delenv("XLLM_HUGE_PAGES")
    assert place_in_huge_pages({"norm": tensors["norm"]}) == 0  # less than a page all together
    assert {name: t.data_ptr() for name, t in tensors.items()} == pointers
