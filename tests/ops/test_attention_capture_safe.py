"""The capture-safe paged attention (what CUDA and NPU graphs run without a fused kernel) against the plain
reference of tests/runtime/test_paged_attention_op.py and the CPU's host-side path, in both of its layouts;
and whole models on it against transformers. tests/test_capture_safety.py proves it capture-safe."""

from __future__ import annotations

import pytest
import torch

from tests.runtime.test_paged_attention_op import Case, make_case
from tests.test_hf_parity import check_parity
from xllm_compiler import ops
from xllm_compiler.ops import attention

CASES = {
    "prefill": ([(13, 13)], {}),
    "prefill-batch": ([(5, 5), (1, 1), (9, 9), (16, 16)], {}),
    "chunked": ([(11, 4), (20, 7), (6, 1), (9, 9)], {}),
    "decode-batch": ([(7, 1), (1, 1), (16, 1), (13, 1), (3, 1)], {}),
    "decode-one": ([(10, 1)], {}),
    "window-chunked": ([(15, 5), (8, 2)], dict(sliding_window=3)),
    "window-decode": ([(9, 1), (2, 1), (14, 1)], dict(sliding_window=5)),
    "window-1": ([(12, 12), (3, 1)], dict(sliding_window=1)),
    "padding": ([(12, 3), (6, 1)], dict(pad_tokens=5, sliding_window=4)),
    "padding-seqs": ([(6, 1), (10, 1), (3, 1)], dict(pad_tokens=2, pad_seqs=3)),
    "empty-seq-between": ([(5, 5), (0, 0), (8, 3)], {}),
    "only-padding": ([], dict(pad_tokens=3, pad_seqs=2)),
}


@pytest.fixture(params=["context-per-token", "all-contexts"])
def layout(request, monkeypatch):
    """Force each of the composite's two layouts (it picks one by the static sizes)."""
    per_token = request.param == "context-per-token"
    monkeypatch.setattr(attention, "_one_context_per_token", lambda *sizes: per_token)
    return request.param


def host_path(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU kernel's output and cache, on a copy of the case's cache."""
    args = list(case.args)
    args[3] = case.cache_before.clone()
    out = torch.empty_like(args[0])
    attention._host_paged_attention_out(*args, out)
    return out, args[3]


@pytest.mark.parametrize("name", CASES)
def test_matches_the_reference_and_the_cpu_path(name, layout):
    lengths, options = CASES[name]
    case = make_case(lengths, seed=len(name), **options)
    out = attention.capture_safe_paged_attention(*case.args)
    torch.testing.assert_close(out, case.expected, rtol=1e-5, atol=1e-5)
    assert out[case.num_real_tokens :].eq(0).all()
    host_out, host_cache = host_path(case)
    torch.testing.assert_close(out, host_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(case.args[3], host_cache)  # the same slots written, nothing else touched


@pytest.mark.parametrize("name", ["chunked", "decode-batch", "padding"])
def test_bfloat16_matches_the_cpu_path(name, layout):
    lengths, options = CASES[name]
    case = make_case(lengths, seed=3, **options)
    case.args = tuple(a.bfloat16() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in case.args)
    case.cache_before = case.args[3].clone()
    out = attention.capture_safe_paged_attention(*case.args)
    torch.testing.assert_close(out, host_path(case)[0], rtol=1.6e-2, atol=1.6e-2)


@pytest.mark.parametrize("split", [1, 4, 9])
def test_micro_batches_with_token_offset_match_the_whole_step(split, layout):
    """Two calls on rows [0, split) and [split, T) (token_offset = split) give the one call's output: a
    sequence cut in two sees, in its second half, the keys its first half wrote."""
    case = make_case([(11, 4), (20, 7), (6, 1)], pad_tokens=2, sliding_window=5, seed=12)
    query, key, value, cache, slots, *metadata = case.args
    out = torch.empty_like(query)
    for rows, offset in ((slice(0, split), 0), (slice(split, None), split)):
        attention.capture_safe_paged_attention_out(
            query[rows], key[rows], value[rows], cache, slots[rows], *metadata, out[rows], offset
        )
    torch.testing.assert_close(out, case.expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ["MistralForCausalLM", "Qwen3ForCausalLM"])
def test_models_on_the_capture_safe_attention_match_transformers(checkpoints, monkeypatch, architecture):
    """The runtime on CPU with its attention kernels swapped for the capture-safe ones (a sliding window
    in Mistral, head_dim 32 in Qwen3): the same logits and greedy tokens as transformers."""
    calls = []

    def counted(kernel):
        def run(*args, **kwargs):
            calls.append(kernel)
            return kernel(*args, **kwargs)

        return run

    for op, kernel in attention.CAPTURE_SAFE_KERNELS.items():
        monkeypatch.setitem(ops.KERNELS, op, counted(kernel))  # read by the CPU platform when it loads
    model_dir, hf_model = checkpoints.checkpoint(architecture)
    check_parity(checkpoints, hf_model, model_dir)
    assert calls


@pytest.mark.gpu
def test_a_cuda_graph_of_the_composite_replays_for_new_lengths():
    """Captured once, replayed with other lengths, block tables and slots copied into the same buffers.
    Not run on this project's CPU machines (the ``gpu`` tier)."""
    cases = [
        make_case([(11, 4), (20, 7), (6, 1)], pad_tokens=2, sliding_window=5, seed=13),
        make_case([(17, 1), (9, 9), (15, 2)], pad_tokens=2, sliding_window=5, seed=14),  # the same shapes
    ]
    static = [a.cuda() if isinstance(a, torch.Tensor) else a for a in cases[0].args]
    out = torch.empty_like(static[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        attention.capture_safe_paged_attention_out(*static, out)  # warm-up, off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attention.capture_safe_paged_attention_out(*static, out)
    for case in cases:
        for buffer, value in zip(static, case.args, strict=True):
            if isinstance(buffer, torch.Tensor):
                buffer.copy_(value)
        graph.replay()
        torch.testing.assert_close(out.cpu(), case.expected, rtol=1e-4, atol=1e-4)
