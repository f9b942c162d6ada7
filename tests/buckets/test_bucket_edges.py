"""Buckets are invisible in the results: at, below and above every bucket edge, a run on bucket graphs (padded)
gives the logits and tokens of the same run forced onto the dynamic fallback graph (unpadded); padding writes
only the reserved KV block; and a bounded graph cache (LRU) rebuilds graphs without changing any result."""

from __future__ import annotations

import pytest
import torch

import xllm_compiler
from tests.hf_oracle import mixed_prompts
from xllm_compiler.buckets import DECODE, PREFILL
from xllm_compiler.interface import RESERVED_BLOCKS
from xllm_compiler.runtime.graph_cache import FALLBACK, Choice
from xllm_compiler.runtime.requests import Request, SamplingParams
from xllm_compiler.runtime.step import Sequence

DECODE_BUCKETS = [1, 2, 4]
PREFILL_BUCKETS = [8, 16]
BLOCK_SIZE = 8  # small blocks, so that prompts and generations cross block boundaries
NEW_TOKENS = 8
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster than waking a pool (see tests/passes/conftest.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama(checkpoints):
    return checkpoints.checkpoint("LlamaForCausalLM")


@pytest.fixture(scope="module")
def artifact(checkpoints, llama):
    model_dir, _ = llama
    return checkpoints.artifact(
        model_dir,
        decode_buckets=DECODE_BUCKETS,
        prefill_buckets=PREFILL_BUCKETS,
        max_seq_len=64,
        block_size=BLOCK_SIZE,
    )


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


class Run:
    """A loaded model whose every engine step is recorded: (phase, graph, logits)."""

    def __init__(self, artifact, dynamic: bool, **load_options):
        self.model = xllm_compiler.load(artifact, **load_options)
        graphs = self.model.engine.graphs
        self.graphs_used: list[str] = []
        self.logits: list[torch.Tensor] = []
        self.phases: list[str] = []
        choose = graphs.choose
        step = self.model.engine.step

        def forced(phase, num_tokens, num_seqs):
            return Choice(FALLBACK, num_tokens, num_seqs)

        def recording_choose(phase, num_tokens, num_seqs):
            choice = (forced if dynamic else choose)(phase, num_tokens, num_seqs)
            self.graphs_used.append(choice.graph)
            return choice

        def recording_step(phase, work):
            out = step(phase, work)
            self.phases.append(phase)
            self.logits.append(out.clone())
            self.resident_after.append(len(graphs.resident()))
            return out

        self.resident_after: list[int] = []
        graphs.choose = recording_choose
        self.model.engine.step = recording_step

    def generate(self, prompts, new_tokens=NEW_TOKENS, max_num_batched_tokens=64):
        """Greedy tokens, through a scheduler whose limits are above the buckets (as a server configured past
        them is), so that a step above the largest bucket runs on the fallback graph, not in chunks."""
        scheduler = self.model.make_scheduler(max_num_seqs=8, max_num_batched_tokens=max_num_batched_tokens)
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        outputs = scheduler.run(Request(str(i), list(p), params) for i, p in enumerate(prompts))
        return [[t for out in outputs[str(i)] for t in out.new_tokens] for i in range(len(prompts))]


def assert_same_steps(bucketed: Run, dynamic: Run) -> None:
    assert bucketed.phases == dynamic.phases
    assert set(dynamic.graphs_used) == {FALLBACK}
    for ours, reference in zip(bucketed.logits, dynamic.logits, strict=True):
        assert ours.shape == reference.shape
        assert relative_error(ours, reference) <= TOLERANCE


# -- logits and tokens at the edges -------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [7, 8, 9, 15, 16, 17])
def test_prompt_around_a_prefill_edge_matches_the_unbucketed_run(artifact, llama, length):
    _, hf_model = llama
    prompt = mixed_prompts(hf_model.config.vocab_size, lengths=(length,), seed=100 + length)
    bucketed, dynamic = Run(artifact, dynamic=False), Run(artifact, dynamic=True)

    tokens = bucketed.generate(prompt)
    assert tokens == dynamic.generate(prompt)
    assert_same_steps(bucketed, dynamic)
    assert len(bucketed.logits) == NEW_TOKENS
    expected_prefill = next((f"prefill_{t}" for t in PREFILL_BUCKETS if t >= length), FALLBACK)
    assert bucketed.graphs_used[0] == expected_prefill
    assert bucketed.graphs_used[1:] == ["decode_1"] * (NEW_TOKENS - 1)
    stats = bucketed.model.stats()
    padded = 0 if expected_prefill == FALLBACK else int(expected_prefill.split("_")[1]) - length
    assert stats.get("padded_tokens", 0) == padded

    logits = Run(artifact, dynamic=False).model.logits(prompt)
    reference = Run(artifact, dynamic=True).model.logits(prompt)
    assert relative_error(logits, reference) <= TOLERANCE


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5])
def test_decode_batch_around_the_decode_edges_matches_the_unbucketed_run(artifact, llama, batch):
    _, hf_model = llama
    prompts = mixed_prompts(hf_model.config.vocab_size, lengths=tuple(range(2, 2 + batch)), seed=200 + batch)
    bucketed, dynamic = Run(artifact, dynamic=False), Run(artifact, dynamic=True)

    assert bucketed.generate(prompts) == dynamic.generate(prompts)
    assert_same_steps(bucketed, dynamic)
    decode_graphs = {g for g, p in zip(bucketed.graphs_used, bucketed.phases, strict=True) if p == DECODE}
    expected = next((f"decode_{b}" for b in DECODE_BUCKETS if b >= batch), FALLBACK)
    assert decode_graphs == {expected}

    logits = Run(artifact, dynamic=False).model.logits(prompts)
    assert relative_error(logits, Run(artifact, dynamic=True).model.logits(prompts)) <= TOLERANCE


def test_mixed_batch_across_every_edge_matches_the_unbucketed_run(artifact, llama):
    _, hf_model = llama
    prompts = mixed_prompts(hf_model.config.vocab_size, lengths=(7, 1, 9, 16, 3, 17, 8), seed=300)
    bucketed, dynamic = Run(artifact, dynamic=False), Run(artifact, dynamic=True)
    # Steps of at most the largest prefill bucket's tokens (prompts go in chunks) but 7 sequences: the decode
    # steps are above the largest decode bucket.
    budget = max(PREFILL_BUCKETS)
    assert bucketed.generate(prompts, max_num_batched_tokens=budget) == dynamic.generate(
        prompts, max_num_batched_tokens=budget
    )
    assert_same_steps(bucketed, dynamic)
    used = set(bucketed.graphs_used)
    assert FALLBACK in used and any(g.startswith("prefill_") for g in used)


# -- padding never leaks into the KV cache ---------------------------------------------------------------------


UNUSED_BLOCK_SENTINEL = 3.0  # what the blocks no request is handed hold, so a stray write to them shows


def run_by_hand(artifact, dynamic: bool, prompts: list[list[int]], decode_steps: int):
    """A prefill of all prompts together, then greedy decode steps of all of them, through engine.step.

    The pool zeroes a block when it first hands it out and leaves the others uninitialised; they are filled
    with a sentinel here so the test can tell that nothing wrote to them."""
    run = Run(artifact, dynamic=dynamic)
    engine = run.model.engine
    engine.kv_cache.tensor[:, :, RESERVED_BLOCKS:] = UNUSED_BLOCK_SENTINEL
    seqs = [Sequence(tokens=list(p), prompt_len=len(p), max_new_tokens=decode_steps + 1) for p in prompts]
    for seq in seqs:
        seq.blocks = engine.pool.allocate(engine.blocks_for(seq.prompt_len + seq.max_new_tokens))
    logits = engine.step(PREFILL, [(s, len(s.tokens)) for s in seqs])
    for _ in range(decode_steps):
        for seq, token in zip(seqs, logits.argmax(-1).tolist(), strict=True):
            seq.tokens.append(token)
        logits = engine.step(DECODE, [(s, 1) for s in seqs])
    return run, seqs


@pytest.mark.parametrize(
    ("lengths", "prefill_graph", "decode_graph"),
    [
        ((5, 6, 2), "prefill_16", "decode_4"),  # 13 tokens of 3 prompts: 3 padding tokens, 1 padding sequence
        ((3,), "prefill_8", "decode_1"),  # 5 padding tokens
        ((7, 6), "prefill_16", "decode_2"),  # 3 padding tokens, 2 padding sequences (prefill_16 takes 4)
    ],
)
def test_padding_writes_only_the_reserved_block(artifact, llama, lengths, prefill_graph, decode_graph):
    _, hf_model = llama
    prompts = mixed_prompts(hf_model.config.vocab_size, lengths=lengths, seed=400 + sum(lengths))
    decode_steps = 4
    padded, padded_seqs = run_by_hand(artifact, False, prompts, decode_steps)
    exact, exact_seqs = run_by_hand(artifact, True, prompts, decode_steps)
    assert padded.graphs_used == [prefill_graph] + [decode_graph] * decode_steps
    assert padded.model.stats()["padded_tokens"] > 0
    assert [s.tokens for s in padded_seqs] == [s.tokens for s in exact_seqs]
    assert [s.blocks for s in padded_seqs] == [s.blocks for s in exact_seqs]

    ours, reference = padded.model.engine.kv_cache.tensor, exact.model.engine.kv_cache.tensor
    owned = sorted(b for s in padded_seqs for b in s.blocks)
    assert min(owned) >= RESERVED_BLOCKS  # block 0 is never handed out
    # The sequences' own blocks hold the same K/V, whatever padding the bucket added.
    torch.testing.assert_close(ours[:, :, owned], reference[:, :, owned], rtol=1e-5, atol=1e-6)
    # Slots past each sequence's computed tokens were never written.
    for seq in padded_seqs:
        cache = ours[:, :, seq.blocks].flatten(2, 3)  # [layers, 2, slots of this sequence, heads, dim]
        assert cache[:, :, : seq.num_computed].abs().amax(dim=(0, 1, 3, 4)).gt(0).all()
        assert cache[:, :, seq.num_computed :].abs().max() == 0
    # Padding tokens wrote their K/V to the reserved block only; the unpadded run never touched it.
    assert ours[:, :, 0].abs().max() > 0
    assert reference[:, :, 0].abs().max() == 0
    others = [b for b in range(RESERVED_BLOCKS, ours.shape[2]) if b not in owned]
    assert (ours[:, :, others] == UNUSED_BLOCK_SENTINEL).all()
    assert (reference[:, :, others] == UNUSED_BLOCK_SENTINEL).all()
    # Owned blocks agree within the tolerance above (aten's GEMMs round differently at another row count).
    close = [torch.allclose(ours[:, :, b], reference[:, :, b], rtol=1e-5, atol=1e-6) for b in range(ours.shape[2])]
    differing = [b for b, same in enumerate(close) if not same]
    assert differing == [0]


# -- the LRU graph cache ---------------------------------------------------------------------------------------


def workload(vocab_size: int) -> list[tuple[list[list[int]], int]]:
    """Calls that alternate between buckets: prefill_16 + decode_1, prefill_8 + decode_2, then the first again."""
    long_prompt = mixed_prompts(vocab_size, lengths=(12,), seed=500)
    pair = mixed_prompts(vocab_size, lengths=(5, 3), seed=501)
    return [(long_prompt, 3), (pair, 3), (long_prompt, 3), (pair, 2)]


def run_workload(run: Run, vocab_size: int) -> list:
    return [run.generate(prompts, new_tokens) for prompts, new_tokens in workload(vocab_size)]


def test_one_resident_graph_gives_the_same_results_and_rebuilds_graphs(artifact, llama):
    _, hf_model = llama
    vocab = hf_model.config.vocab_size
    bounded, unbounded = Run(artifact, dynamic=False, max_resident_graphs=1), Run(artifact, dynamic=False)

    assert run_workload(bounded, vocab) == run_workload(unbounded, vocab)
    assert bounded.graphs_used == unbounded.graphs_used
    for ours, reference in zip(bounded.logits, unbounded.logits, strict=True):
        assert torch.equal(ours, reference)

    distinct = set(bounded.graphs_used) - {FALLBACK}
    assert distinct == {"prefill_16", "decode_1", "prefill_8", "decode_2"}
    assert max(bounded.resident_after) == 1
    assert len(bounded.model.engine.graphs.resident()) <= 1
    assert bounded.model.stats()["misses"] > len(distinct)  # evicted graphs were built again
    assert unbounded.model.stats()["misses"] == len(distinct)  # each built once, then resident
    assert set(unbounded.model.engine.graphs.resident()) == distinct
    for run in (bounded, unbounded):
        stats = run.model.stats()
        assert stats["hits"] + stats["misses"] == stats["steps"] == len(run.graphs_used)


def test_lru_keeps_the_most_recent_graphs(artifact, llama):
    _, hf_model = llama
    run = Run(artifact, dynamic=False, max_resident_graphs=2)
    run_workload(run, hf_model.config.vocab_size)
    assert max(run.resident_after) == 2
    # The last call ran prefill_8 then decode_2: those two stay, most recent last.
    assert run.model.engine.graphs.resident() == ["prefill_8", "decode_2"]
