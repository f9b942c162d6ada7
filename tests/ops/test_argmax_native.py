"""ops/cpu_kernels.cpp's argmax_rows (greedy sampling's argmax) against torch.argmax: the first index of the
largest value, a NaN counting as the largest, over widths on and off the 16-lane vector."""

from __future__ import annotations

import pytest
import torch

from xllm_compiler.ops.native import native_kernels
from xllm_compiler.runtime.sampling import greedy_tokens

native = native_kernels()
pytestmark = pytest.mark.skipif(native is None, reason="no native kernels in this build")


def rows_of(kind: str, rows: int, width: int) -> torch.Tensor:
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(width + rows))
    if kind == "tied":  # the largest value twice: the first is the answer
        x[:, width // 2] = x.max() + 1
        x[:, -1] = x.max()
    elif kind == "nan":
        x[0, (2 * width) // 3] = float("nan")
    elif kind == "two nans":
        x[0, 0] = x[0, -1] = float("nan")
    elif kind == "all -inf":
        x.fill_(float("-inf"))
    elif kind == "coarse":  # five values: ties everywhere
        x = (4 * x).round().clamp(-2, 2)
    elif kind == "signed zeros":  # -0.0 == 0.0: the first zero of either sign
        x.zero_()
        x[:, width // 3] = -0.0
    return x


@pytest.mark.parametrize("width", [1, 5, 16, 17, 31, 32000, 32003])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("kind", ["random", "tied", "nan", "two nans", "all -inf", "coarse", "signed zeros"])
def test_argmax_rows_is_torchs_argmax(width, rows, kind):
    logits = rows_of(kind, rows, width)
    assert native.argmax_rows(logits) == logits.argmax(dim=-1).tolist()


def test_argmax_rows_reads_a_strided_input_and_refuses_other_dtypes():
    logits = torch.randn(4, 64)[:, ::2]
    assert native.argmax_rows(logits) == logits.argmax(dim=-1).tolist()
    with pytest.raises(RuntimeError, match=r"argmax_rows takes float32 CPU logits \[rows, vocab\]"):
        native.argmax_rows(torch.randn(2, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="an empty vocabulary has no argmax"):
        native.argmax_rows(torch.empty(2, 0))


def test_greedy_tokens_take_torchs_argmax_where_the_kernel_does_not_apply():
    logits = torch.randn(3, 100, dtype=torch.bfloat16)
    assert greedy_tokens(logits) == logits.argmax(dim=-1).tolist()
    assert greedy_tokens(logits.float()) == logits.float().argmax(dim=-1).tolist()
