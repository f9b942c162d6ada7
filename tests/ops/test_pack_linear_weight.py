"""pack_linear_weight (ops/cpu_linear.cpp) against the layout's definition, on whole and ragged shapes.

The packed kernel's numerics are checked in test_native_kernels.py; this pins the layout itself, which
the pack writes with its own tiled transpose: [ceil(N/64), ceil(K/pair), 64, pair], zero-padded.
"""

from __future__ import annotations

import pytest
import torch

from xllm_compiler.ops.native import native_kernels
from xllm_compiler.runtime.platform.cpu import packable_dtypes


def reference_pack(weight: torch.Tensor) -> torch.Tensor:
    outputs, k_size = weight.shape
    pair = 2 if weight.dtype == torch.bfloat16 else 1
    blocks, steps = -(-outputs // 64), -(-k_size // pair)
    padded = torch.zeros(blocks * 64, steps * pair, dtype=weight.dtype)
    padded[:outputs, :k_size] = weight
    return padded.view(blocks, 64, steps, pair).permute(0, 2, 1, 3).contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(128, 96), (64, 33), (100, 37), (1, 1), (192, 2), (200, 70)])
def test_pack_matches_the_layout(dtype, shape):
    if dtype not in packable_dtypes():
        pytest.skip(f"this build packs no {dtype} linear layers")
    weight = torch.randn(*shape).to(dtype)
    assert torch.equal(native_kernels().pack_linear_weight(weight), reference_pack(weight))
    transposed = torch.randn(shape[1], shape[0]).to(dtype).t()  # a strided view packs like its copy
    assert torch.equal(native_kernels().pack_linear_weight(transposed), reference_pack(transposed.contiguous()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(256, 64), (100, 37), (1, 1)])
def test_embedding_rows_gathered_from_the_packed_table(dtype, shape):
    if dtype not in packable_dtypes():
        pytest.skip(f"this build packs no {dtype} linear layers")
    native = native_kernels()
    table = torch.randn(*shape).to(dtype)
    packed = native.pack_linear_weight(table)
    ids = torch.tensor([0, shape[0] - 1, shape[0] // 2, 0])
    out = torch.empty(len(ids), shape[1], dtype=dtype)
    native.packed_embedding_out(packed, ids, shape[0], out)
    assert torch.equal(out, table[ids])
    grid = ids.view(2, 2)  # aten.embedding's shape rule: indices' shape + [K]
    assert torch.equal(native.packed_embedding(packed, grid, shape[0], shape[1]), table[grid])
    with pytest.raises(RuntimeError, match="out of range"):
        native.packed_embedding(packed, torch.tensor([shape[0]]), shape[0], shape[1])
