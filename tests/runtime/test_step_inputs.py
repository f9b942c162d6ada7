"""runtime/step.py's build_step_inputs: one step's graph inputs, padded to a bucket."""

from __future__ import annotations

import pytest
import torch

from xllm_compiler.interface import PAD_SLOT, STEP_INPUTS
from xllm_compiler.runtime.step import Sequence, build_step_inputs

BLOCK = 4


def test_a_mixed_step_padded_to_its_bucket():
    """A 3-token prefill chunk and a decode token, padded to 6 tokens and 3 sequences."""
    prefill = Sequence(tokens=[11, 12, 13, 14, 15], prompt_len=5, blocks=[7, 2], num_computed=2)
    decode = Sequence(tokens=[21, 22, 23, 24, 25, 26], prompt_len=4, blocks=[5, 9], num_computed=5)
    inputs = build_step_inputs([(prefill, 3), (decode, 1)], 6, 3, BLOCK, 3, torch.device("cpu"))
    assert set(inputs) == {s.name for s in STEP_INPUTS}
    expected = {
        "input_ids": [13, 14, 15, 26, 0, 0],
        "positions": [2, 3, 4, 5, 0, 0],
        "slot_mapping": [7 * BLOCK + 2, 7 * BLOCK + 3, 2 * BLOCK + 0, 9 * BLOCK + 1, PAD_SLOT, PAD_SLOT],
        "query_lens": [3, 1, 0],
        "seq_lens": [5, 6, 0],
        "block_tables": [[7, 2, 0], [5, 9, 0], [0, 0, 0]],
        "logits_indices": [2, 3, 0],
    }
    for name, values in expected.items():
        assert inputs[name].tolist() == values, name
    for name in ("query_lens", "seq_lens", "block_tables"):
        assert inputs[name].dtype == torch.int32
    for name in ("input_ids", "positions", "slot_mapping", "logits_indices"):
        assert inputs[name].dtype == torch.int64 and inputs[name].is_contiguous()


def test_a_sequence_past_its_block_table_is_refused():
    seq = Sequence(tokens=list(range(9)), prompt_len=9, blocks=[1, 2, 3])
    with pytest.raises(ValueError, match="a sequence holds 3 KV blocks; its block table has 2"):
        build_step_inputs([(seq, 9)], 9, 1, BLOCK, 2, torch.device("cpu"))
