"""Tensor parallelism end to end: --tp 2 artifacts run under torchrun (gloo, 2 CPU processes) against
the --tp 1 artifact and transformers, the overlap passes on and off, the artifact's layout, refusals,
and ranks that die or stall; the mixture-of-experts architectures (experts sharded on their
intermediate dim, one all-reduce per MoE layer) in the same launch.

Each torchrun launch costs seconds of start-up, so one launch of ``worker.py`` runs every tensor-parallel
artifact of the module (all architectures, all pass variants) and the tests read its JSON answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import torch
from safetensors import safe_open

import xllm_compiler
from tests.hf_oracle import (
    ARCHITECTURE_CONFIGS,
    DEEPSEEK_CONFIGS,
    MOE_ARCHITECTURE_CONFIGS,
    TINY,
    hf_greedy,
    hf_last_logits,
    mixed_prompts,
)
from tests.int_quant_checkpoint import gptq_config, quantize_checkpoint
from tests.test_capture_safety import artifact_graphs
from xllm_compiler import cli, run
from xllm_compiler.artifact.manifest import read_manifest
from xllm_compiler.errors import ConfigError, InputError
from xllm_compiler.options import DEFAULT_MICRO_BATCH_MIN_TOKENS

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")
ARCHITECTURES = sorted(ARCHITECTURE_CONFIGS)
#: Kept apart from ARCHITECTURES, whose tests count dense-model collectives and layouts.
MOE_ARCHITECTURES = sorted(MOE_ARCHITECTURE_CONFIGS)
#: Latent attention (heads split, the latent whole on every rank) and grouped sigmoid routing; name -> the
#: checkpoint's overrides ("+q-lora": q_a_proj replicated, q_b_proj split by heads).
DEEPSEEK_RUNS = {**{a: {} for a in DEEPSEEK_CONFIGS}, "DeepseekV3ForCausalLM+q-lora": dict(q_lora_rank=12)}
DEEPSEEK_ARCHITECTURES = sorted(DEEPSEEK_RUNS)
#: micro_batch_min_tokens=8 (the default is 256) so that the tiny buckets below are split too.
OPTIONS = dict(
    decode_buckets=[1, 2, 4, 8], prefill_buckets=[16, 32], max_seq_len=64, cache_dir="", micro_batch_min_tokens=8
)
NEW_TOKENS = 12
SAMPLE_SEED = 3
#: Prefill steps of 29 (prefill_32), 40 (past the largest bucket: the dynamic graph), 12 (prefill_16)
#: and 30 tokens (prefill_32); then 7 sequences decode together in decode_8 (one padding row). The
#: micro-batch split applies to decode_8 and the prefill buckets, so every split graph runs.
PROMPT_LENGTHS = (5, 1, 23, 40, 9, 3, 30)
SPLIT_BUCKETS = ("decode_8", "prefill_16", "prefill_32")
WHOLE_BUCKETS = ("decode_1", "decode_2", "decode_4")
OVERLAP_PASSES = ("split_micro_batches", "reorder_collectives", "fuse_all_reduce_add_rms_norm")
#: Llama compiled --tp 2 with these passes disabled.
VARIANTS = {
    "all-passes": (),
    "no-split": ("split_micro_batches",),
    "no-reorder": ("reorder_collectives",),
    "no-fusion": ("fuse_all_reduce_add_rms_norm",),
    "no-overlap-passes": OVERLAP_PASSES,
}
#: A 4-bit GPTQ Llama (models/int4_linear.py), kept in its integers on every rank.
GPTQ = "LlamaForCausalLM+gptq4"
#: --tp 2 against --tp 1 where the native int4 kernel runs (it rounds its inputs to int8); float rounding without it.
GPTQ_TOLERANCE = 0.05
LAUNCH_TIMEOUT_S = 240
XLLM_RUN_ARGS = ("--prompt-ids", "1,2,3", "--max-new-tokens", str(NEW_TOKENS))
#: What a process prints when a gloo worker thread outlives the interpreter (see
#: test_xllm_run_releases_the_process_group_before_exit).
EXIT_ABORT = "terminate called without an active exception"


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Launch:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def explain(self) -> str:
        tails = f"stdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}"
        return f"exit {self.returncode} after {self.seconds:.1f} s\n{tails}"


def torchrun(nproc: int, *args: str, env: dict[str, str] | None = None, timeout: float = LAUNCH_TIMEOUT_S) -> Launch:
    """``python -m torch.distributed.run --nproc-per-node NPROC ... ARGS`` on a free port. ``timeout`` is a
    hang detector, not a speed bound: a launch that outlives it is killed, ranks included, and the test
    fails with what they printed."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *args,
    ]
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environ.update({"OMP_NUM_THREADS": "1", **(env or {})})
    start = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts every rank in a session of its own: kill the whole tree, or the ranks keep the
        # pipes open (and the test waiting) for as long as they hang.
        tree = psutil.Process(process.pid)
        for proc in [*tree.children(recursive=True), tree]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        stdout, stderr = process.communicate()
        hung = Launch(process.returncode, stdout, stderr, time.monotonic() - start)
        pytest.fail(f"torchrun {' '.join(args)} hung: killed after {timeout} s\n{hung.explain()}")
    return Launch(process.returncode, stdout, stderr, time.monotonic() - start)


def run_worker(
    tmp: Path, artifacts: dict[str, Path], prompts, *flags: str, env=None, timeout=LAUNCH_TIMEOUT_S, **jobs_extra
):
    """One worker launch over ``artifacts``; (launch, {rank: that rank's JSON})."""
    tmp.mkdir(parents=True, exist_ok=True)
    jobs = tmp / "jobs.json"
    artifacts = {name: str(path) for name, path in artifacts.items()}
    spec = {"artifacts": artifacts, "prompts": prompts, "max_new_tokens": NEW_TOKENS, "sample_seed": SAMPLE_SEED}
    jobs.write_text(json.dumps({**spec, **jobs_extra}))
    launch = torchrun(2, str(WORKER), str(jobs), str(tmp), *flags, env=env, timeout=timeout)
    answers = {r: json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1) if (tmp / f"rank{r}.json").is_file()}
    return launch, answers


@dataclass
class TensorParallelRun:
    prompts: list[list[int]]
    tp1: dict[str, Path] = field(default_factory=dict)  # architecture -> --tp 1 artifact
    tp2: dict[str, Path] = field(default_factory=dict)  # architecture, variant or "cached" -> --tp 2 artifact
    hf: dict[str, object] = field(default_factory=dict)
    reference: dict[str, dict] = field(default_factory=dict)  # architecture -> the --tp 1 run, in this process
    ranks: dict[int, dict] = field(default_factory=dict)  # rank -> worker JSON
    stdout: str = ""  # the worker launch's

    def result(self, name: str, rank: int = 0) -> dict:
        return self.ranks[rank]["results"][name]


@pytest.fixture(scope="module")
def tp_run(checkpoints, tmp_path_factory) -> TensorParallelRun:
    """Every architecture (dense and MoE) at --tp 1 and --tp 2, Llama's pass variants and a --tp 2 compile
    restored from the compile cache; the --tp 1 artifacts run here, all --tp 2 ones in one torchrun launch
    of 2 ranks."""
    root = tmp_path_factory.mktemp("tp")
    prompts = mixed_prompts(TINY["vocab_size"], lengths=PROMPT_LENGTHS)
    state = TensorParallelRun(prompts)
    for architecture in (*ARCHITECTURES, *MOE_ARCHITECTURES, *DEEPSEEK_ARCHITECTURES):
        overrides = DEEPSEEK_RUNS.get(architecture, {})
        model_dir, hf_model = checkpoints.checkpoint(architecture.partition("+")[0], **overrides)
        state.hf[architecture] = hf_model
        state.tp1[architecture] = checkpoints.artifact(model_dir, **OPTIONS)
        state.tp2[architecture] = checkpoints.artifact(model_dir, tp=2, **OPTIONS)
        model = xllm_compiler.load(state.tp1[architecture])
        state.reference[architecture] = {
            "logits": model.logits(prompts),
            "tokens": model.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True),
            "sampled": model.generate(
                prompts, max_new_tokens=NEW_TOKENS, temperature=1.0, seed=SAMPLE_SEED, ignore_eos=True
            ),
        }
    llama_dir, _ = checkpoints.checkpoint("LlamaForCausalLM")
    gptq_dir = root / "gptq"
    quantize_checkpoint(llama_dir, gptq_dir, gptq_config(4, 32, False))
    state.tp1[GPTQ], state.tp2[GPTQ] = (checkpoints.artifact(gptq_dir, tp=tp, **OPTIONS) for tp in (1, 2))
    state.reference[GPTQ] = {"logits": xllm_compiler.load(state.tp1[GPTQ]).logits(prompts)}
    for variant, disabled in VARIANTS.items():
        state.tp2[variant] = checkpoints.artifact(llama_dir, tp=2, disable_passes=list(disabled), **OPTIONS)
    cached = {**OPTIONS, "cache_dir": str(root / "cache")}
    xllm_compiler.compile(llama_dir, root / "cache-miss", tp=2, **cached)
    report = xllm_compiler.compile(llama_dir, root / "cache-hit", tp=2, **cached)
    assert report["cache"]["hit"]
    state.tp2["cached"] = root / "cache-hit"

    xllm_run = [str(state.tp2["LlamaForCausalLM"]), *XLLM_RUN_ARGS]
    launch, state.ranks = run_worker(root / "worker", state.tp2, prompts, xllm_run=xllm_run)
    assert launch.returncode == 0, launch.explain()
    assert sorted(state.ranks) == [0, 1], launch.explain()
    state.stdout = launch.stdout
    return state


# -- numerics: --tp 2 against --tp 1 and transformers ---------------------------------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_tp2_matches_tp1_and_transformers(tp_run, architecture):
    ours = tp_run.result(architecture)
    logits = torch.tensor(ours["logits"])
    reference = tp_run.reference[architecture]
    assert relative_error(logits, reference["logits"]) < 1e-4
    assert ours["tokens"] == reference["tokens"]
    hf_model = tp_run.hf[architecture]
    assert relative_error(logits, hf_last_logits(hf_model, tp_run.prompts)) < 1e-4
    assert ours["tokens"] == [hf_greedy(hf_model, p, NEW_TOKENS) for p in tp_run.prompts]


def test_gptq_tp2_keeps_the_integers_and_matches_tp1(tp_run):
    """A 4-bit GPTQ checkpoint (groups of 32): every rank runs linear_w4 on its shard of the integers, the
    row-parallel o_proj and down_proj split at a group boundary, and the split buckets hold as many
    all-reduces as the float model's; the int4 kernel rounds each group of its inputs to int8, so sums in
    another order can move a rounding step (tests/quant/test_int4_model.py)."""
    for root in (tp_run.tp1[GPTQ], tp_run.tp2[GPTQ]):
        assert read_manifest(root).checkpoint_quantization.linear_layers == 14
    for bucket in (*WHOLE_BUCKETS, *SPLIT_BUCKETS):  # split_micro_batches splits linear_w4 as it does aten.linear
        float_twin = collectives_and_moe_ops(tp_run.tp2["LlamaForCausalLM"], bucket)
        assert collectives_and_moe_ops(tp_run.tp2[GPTQ], bucket) == float_twin, bucket
    logits = torch.tensor(tp_run.result(GPTQ)["logits"])
    assert relative_error(logits, tp_run.reference[GPTQ]["logits"]) < GPTQ_TOLERANCE


@pytest.mark.parametrize("architecture", MOE_ARCHITECTURES)
def test_moe_tp2_matches_tp1(tp_run, architecture):
    """Sharding every expert's intermediate dim changes only the order of a sum: fp32 logits within 1e-5
    relative of --tp 1, and the same greedy tokens."""
    ours, reference = tp_run.result(architecture), tp_run.reference[architecture]
    assert relative_error(torch.tensor(ours["logits"]), reference["logits"]) < 1e-5
    assert ours["tokens"] == reference["tokens"]


@pytest.mark.parametrize("architecture", DEEPSEEK_ARCHITECTURES)
def test_deepseek_tp2_matches_tp1(tp_run, architecture):
    """Each rank holds half the heads (q_proj or q_b_proj, kv_b_proj, o_proj) and half of every expert; the
    latent and the router are replicated: only the order of sums changes, so fp32 logits within 1e-5
    relative of --tp 1 (and 1e-4 of transformers), and the same greedy tokens."""
    ours, reference = tp_run.result(architecture), tp_run.reference[architecture]
    logits = torch.tensor(ours["logits"])
    assert relative_error(logits, reference["logits"]) < 1e-5
    assert ours["tokens"] == reference["tokens"]
    assert relative_error(logits, hf_last_logits(tp_run.hf[architecture], tp_run.prompts)) < 1e-4


@pytest.mark.parametrize("architecture", DEEPSEEK_ARCHITECTURES)
def test_deepseek_tp2_keeps_the_whole_latent(tp_run, architecture):
    """Every rank's cache row is the whole latent (kv_lora_rank + qk_rope_head_dim, one row for all heads):
    its heads each read all of it. What expanded K/V would take is per rank (half the heads). The latent's
    projection and q_a_proj are the same tensors on both ranks; kv_b_proj and q_proj or q_b_proj a different
    half of the heads on each."""
    config = tp_run.hf[architecture].config
    latent = config.kv_lora_rank + config.qk_rope_head_dim
    manifests = {tp: read_manifest(run[architecture]) for tp, run in ((1, tp_run.tp1), (2, tp_run.tp2))}
    per_head = config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim
    for tp, manifest in manifests.items():
        assert (manifest.kv_cache.planes, manifest.model.num_kv_heads, manifest.model.head_dim) == (1, 1, latent)
        assert manifest.kv_cache.expanded_width == config.num_attention_heads // tp * per_head
    half = config.num_attention_heads // 2
    q_rows = half * (config.qk_nope_head_dim + config.qk_rope_head_dim)
    queries = {"q_a_proj": config.q_lora_rank, "q_b_proj": q_rows} if config.q_lora_rank else {"q_proj": q_rows}
    rows = {"kv_a_proj_with_mqa": latent, "kv_b_proj": half * (config.qk_nope_head_dim + config.v_head_dim), **queries}
    replicated = ("kv_a_proj_with_mqa", "q_a_proj")
    ranks = []
    for weights in manifests[2].tensor_parallel.weights:
        with safe_open(tp_run.tp2[architecture] / weights, "pt") as f:
            ranks.append({k: f.get_tensor(k) for k in f.keys() if k.endswith(tuple(f"{p}.weight" for p in rows))})  # noqa: SIM118
    assert {name.split(".")[-2] for name in ranks[0]} == set(rows)
    for name, zero in ranks[0].items():
        projection = name.split(".")[-2]
        assert zero.shape[0] == rows[projection], name
        assert torch.equal(zero, ranks[1][name]) == (projection in replicated), name


@pytest.mark.parametrize("architecture", DEEPSEEK_ARCHITECTURES)
def test_deepseek_layer_has_two_all_reduces(tp_run, architecture):
    """Per layer, attention's all-reduce and the MLP's or MoE block's (routed and shared experts' partial sums
    joined first). split_micro_batches splits MLA's expanded attention and DeepSeek's routing, so the split
    prefill buckets hold them twice, once per micro-batch; a decode bucket attends absorbed (its per-head
    matmuls put the heads first, so no value after them is token-wise) and stays whole."""
    layers = tp_run.hf[architecture].config.num_hidden_layers
    for bucket in (*WHOLE_BUCKETS, *SPLIT_BUCKETS):
        split = bucket in SPLIT_BUCKETS and bucket.startswith("prefill")
        assert collectives_and_moe_ops(tp_run.tp2[architecture], bucket)[0] == (4 if split else 2) * layers, bucket


def collectives_and_moe_ops(artifact: Path, bucket: str) -> tuple[int, int]:
    """(all-reduces, fused MoE ops) in one bucket's graph; an all-reduce fused with its add + norm counts."""
    graph = next(g for rel, g in artifact_graphs(artifact).items() if Path(rel).stem == bucket)
    targets = [str(node.target) for node in graph.nodes if node.op == "call_function"]
    return sum("all_reduce" in t for t in targets), sum(t.startswith("xllm.fused_moe") for t in targets)


@pytest.mark.parametrize("architecture", MOE_ARCHITECTURES)
def test_moe_layer_has_one_all_reduce(tp_run, architecture):
    """Per layer, attention's all-reduce and the MoE block's: the shared expert's partial sum joins the
    routed experts' before the block's one collective. The experts stay one fused op per layer, and the
    split buckets hold all of it twice, once per micro-batch."""
    layers = tp_run.hf[architecture].config.num_hidden_layers
    for bucket in WHOLE_BUCKETS:
        assert collectives_and_moe_ops(tp_run.tp2[architecture], bucket) == (2 * layers, layers), bucket
    for bucket in SPLIT_BUCKETS:
        assert collectives_and_moe_ops(tp_run.tp2[architecture], bucket) == (4 * layers, 2 * layers), bucket


def test_run_exercised_the_split_graphs_and_the_fallback(tp_run):
    for name in tp_run.tp2:
        assert set(tp_run.result(name)["graphs"]) >= {*SPLIT_BUCKETS, "dynamic"}, name
        assert tp_run.result(name)["whole_prompts"] == tp_run.result(name)["tokens"], name


def test_ranks_agree(tp_run):
    for name in tp_run.tp2:
        zero, one = tp_run.result(name, 0), tp_run.result(name, 1)
        assert one["tokens"] == zero["tokens"], name
        assert relative_error(torch.tensor(one["logits"]), torch.tensor(zero["logits"])) < 1e-6, name
    assert [tp_run.ranks[r]["rank"] for r in (0, 1)] == [0, 1]
    assert [tp_run.ranks[r]["world_size"] for r in (0, 1)] == [2, 2]


def test_sampling_follows_rank_0(tp_run):
    """Rank 1 samples with another seed, yet both ranks keep rank 0's tokens: those of --tp 1 with rank 0's
    seed."""
    for architecture in ARCHITECTURES:
        zero, one = tp_run.result(architecture, 0), tp_run.result(architecture, 1)
        assert one["sampled"] == zero["sampled"]
        assert zero["sampled"] == tp_run.reference[architecture]["sampled"]
        assert zero["sampled"] != zero["tokens"]  # sampling did sample


def test_artifact_restored_from_the_compile_cache_runs(tp_run):
    assert tp_run.result("cached")["tokens"] == tp_run.reference["LlamaForCausalLM"]["tokens"]
    assert read_manifest(tp_run.tp2["cached"]).tensor_parallel.size == 2


# -- the overlap passes -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_overlap_passes_do_not_change_results(tp_run, variant):
    ours, reference = tp_run.result(variant), tp_run.reference["LlamaForCausalLM"]
    assert ours["tokens"] == reference["tokens"]
    assert ours["tokens"] == tp_run.result("LlamaForCausalLM")["tokens"]
    assert relative_error(torch.tensor(ours["logits"]), reference["logits"]) < 1e-4


def comm(tp_run, variant: str) -> dict[str, dict]:
    return json.loads((tp_run.tp2[variant] / "report.json").read_text())["comm"]


def test_comm_report_shows_what_each_pass_changed(tp_run):
    layers = tp_run.hf["LlamaForCausalLM"].config.num_hidden_layers
    raw = 2 * layers  # one all-reduce after attention, one after the MLP, per layer
    report = {variant: comm(tp_run, variant) for variant in VARIANTS}
    buckets = (*WHOLE_BUCKETS, *SPLIT_BUCKETS)
    for variant in VARIANTS:
        assert sorted(report[variant]) == sorted(buckets), variant

    for bucket in buckets:
        none = report["no-overlap-passes"][bucket]
        assert none["collectives"] == raw and none["overlapped"] == 0, bucket
        # Without the split, all-reduces are fused with the add + norm after them: as many collectives,
        # moving as many bytes, none of them overlapped.
        assert report["no-split"][bucket]["collectives"] == raw, bucket
        assert report["no-split"][bucket]["bytes"] == none["bytes"], bucket
        # Without the reorder, less compute is in flight with the collectives.
        assert report["no-reorder"][bucket]["mean_overlap_window"] < report["all-passes"][bucket]["mean_overlap_window"]
        # Two half-size all-reduces move what one whole one does.
        assert report["no-fusion"][bucket]["bytes"] == none["bytes"], bucket

    for bucket in SPLIT_BUCKETS:  # the split: twice the collectives, every one overlapped; none left to fuse
        for variant in ("all-passes", "no-fusion", "no-reorder"):
            entry = report[variant][bucket]
            assert entry["collectives"] == 2 * raw, (variant, bucket)
        for variant in ("all-passes", "no-fusion"):
            assert report[variant][bucket]["overlapped"] == 2 * raw, (variant, bucket)
        assert report["all-passes"][bucket] == report["no-fusion"][bucket]
    for bucket in WHOLE_BUCKETS:  # too small to split: fusion takes what the reorder cannot hide
        assert report["all-passes"][bucket]["collectives"] == raw, bucket
        assert report["all-passes"][bucket] == report["no-split"][bucket]
        assert report["no-fusion"][bucket]["collectives"] == raw, bucket
        assert report["no-reorder"][bucket]["overlapped"] == 0, bucket


def test_default_threshold_splits_only_long_steps(checkpoints, tmp_path):
    """By default only steps of DEFAULT_MICRO_BATCH_MIN_TOKENS tokens or more are split (smaller ones lose
    more to the extra collectives than the overlap hides); the option moves the line."""
    llama_dir, hf_model = checkpoints.checkpoint("LlamaForCausalLM")
    raw = 2 * hf_model.config.num_hidden_layers
    long_step = DEFAULT_MICRO_BATCH_MIN_TOKENS
    options = dict(decode_buckets=[8], prefill_buckets=[16, long_step], max_seq_len=2 * long_step, cache_dir="")
    xllm_compiler.compile(llama_dir, tmp_path / "default", tp=2, **options)
    report = json.loads((tmp_path / "default" / "report.json").read_text())["comm"]
    assert [report[b]["collectives"] for b in ("decode_8", "prefill_16", f"prefill_{long_step}")] == [raw, raw, 2 * raw]
    assert read_manifest(tmp_path / "default").options.micro_batch_min_tokens == long_step


def test_tp1_report_has_no_comm(tp_run):
    report = json.loads((tp_run.tp1["LlamaForCausalLM"] / "report.json").read_text())
    assert report["comm"] == {}
    assert report["model"]["tensor_parallel"] == 1


# -- the artifact -------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_tp2_artifact_layout(tp_run, architecture):
    artifact = tp_run.tp2[architecture]
    manifest = read_manifest(artifact)
    ranks = ["weights.rank0.safetensors", "weights.rank1.safetensors"]
    assert (manifest.tensor_parallel.size, manifest.tensor_parallel.weights) == (2, ranks)
    assert set(ranks) <= set(manifest.files)
    assert "weights.safetensors" not in manifest.files
    assert not (artifact / "weights.safetensors").exists()
    config = tp_run.hf[architecture].config
    assert manifest.model.num_kv_heads == config.num_key_value_heads // 2
    report = json.loads((artifact / "report.json").read_text())
    assert report["model"]["tensor_parallel"] == 2

    # One graph set serves both ranks: the same tensor names and shapes, different contents (shards).
    with safe_open(artifact / ranks[0], "pt") as zero, safe_open(artifact / ranks[1], "pt") as one:
        names = sorted(zero.keys())
        assert names == sorted(one.keys())
        differ = 0
        for name in names:
            a, b = zero.get_tensor(name), one.get_tensor(name)
            assert a.shape == b.shape, name
            differ += not torch.equal(a, b)
        assert differ > 0


def test_load_without_torchrun_is_refused(tp_run, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(InputError, match=r"torchrun --nproc-per-node 2") as caught:
        xllm_compiler.load(tp_run.tp2["LlamaForCausalLM"])
    assert "tp=2" in str(caught.value)
    assert not torch.distributed.is_initialized()


def test_xllm_run_without_torchrun_exits_2(tp_run, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    code = run.main([str(tp_run.tp2["LlamaForCausalLM"]), "--prompt-ids", "1,2,3"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("xllm-run: error:")
    assert "torchrun --nproc-per-node 2" in lines[0]


def test_torchrun_with_one_process_fails_clearly(tp_run):
    launch = torchrun(
        1, "-m", "xllm_compiler.run", str(tp_run.tp2["LlamaForCausalLM"]), "--prompt-ids", "1,2,3", timeout=120
    )
    assert launch.returncode != 0, launch.explain()
    assert launch.stdout == ""
    errors = [line for line in launch.stderr.splitlines() if line.startswith("xllm-run: ")]
    assert len(errors) == 1, launch.explain()
    assert errors[0].startswith("xllm-run: error:") and "--nproc-per-node 2" in errors[0], errors[0]
    ours = [line for line in launch.stderr.splitlines() if 'File "' in line and str(REPO) in line]
    assert ours == [], launch.explain()  # no traceback through this project's code (torchrun prints its own)


def tp1_xllm_run_line(tp_run, capsys) -> str:
    assert run.main([str(tp_run.tp1["LlamaForCausalLM"]), *XLLM_RUN_ARGS]) == 0
    expected = capsys.readouterr().out
    assert len(expected.splitlines()) == 1
    return expected


def test_torchrun_xllm_run_prints_one_line(tp_run, capsys):
    expected = tp1_xllm_run_line(tp_run, capsys)
    launch = torchrun(2, "-m", "xllm_compiler.run", str(tp_run.tp2["LlamaForCausalLM"]), *XLLM_RUN_ARGS, timeout=120)
    assert launch.stdout == expected, launch.explain()
    assert launch.returncode == 0, launch.explain()


def test_xllm_run_releases_the_process_group_before_exit(tp_run):
    """xllm-run (run.main in the worker launch, under torchrun), then the atexit handlers: by then the group
    must be gone. Left up, ``torchrun -m xllm_compiler.run`` fails about one run in three (a rank exits
    with SIGABRT after printing the right tokens); the race itself cannot be forced, its cause can."""
    for rank in (0, 1):
        assert not tp_run.ranks[rank]["xllm_run"]["process_group_up_at_exit"], f"rank {rank}"


def test_xllm_run_in_the_worker_launch_prints_from_rank_0_only(tp_run, capsys):
    assert [tp_run.ranks[rank]["xllm_run"]["code"] for rank in (0, 1)] == [0, 0]
    assert tp_run.stdout == tp1_xllm_run_line(tp_run, capsys)


# -- refusals at compile time -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "tp", "what", "count"),
    [
        (dict(num_key_value_heads=1), 2, "num_key_value_heads", 1),
        (dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=6), 4, "num_key_value_heads", 6),
        (dict(), 3, "num_key_value_heads", 2),
        (dict(intermediate_size=129), 2, "intermediate_size", 129),
    ],
    ids=["one-kv-head-tp2", "six-heads-tp4", "tp3", "odd-intermediate-tp2"],
)
def test_heads_that_do_not_divide_are_refused(checkpoints, tmp_path, overrides, tp, what, count):
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM", **overrides)
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as caught:
        xllm_compiler.compile(model_dir, out, tp=tp, **OPTIONS)
    message = str(caught.value)
    assert f"{what} {count} " in message, message
    assert re.search(rf"\b{tp}\b", message.replace(f"{what} {count}", "")), message
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_tp_that_does_not_divide_heads(checkpoints, tmp_path, monkeypatch, capsys):
    model_dir, _ = checkpoints.checkpoint("LlamaForCausalLM", num_key_value_heads=1)
    cache = tmp_path / "cache"
    monkeypatch.setenv("XLLM_CACHE_DIR", str(cache))
    out = tmp_path / "out"
    code = cli.main([str(model_dir), str(out), "--tp", "2", "--max-seq-len", "64", "--prefill-buckets", "16"])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("xllm-compile: error:"), captured.err
    assert "num_key_value_heads 1" in lines[0] and "tensor-parallel size 2" in lines[0]
    assert not out.exists()
    assert not (cache / "entries").exists() or list((cache / "entries").iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] in ([], ["cache"])  # no partial output folder either


# -- ranks that die or stall --------------------------------------------------------------------------


def test_rank_that_exits_fails_the_run_instead_of_hanging(tp_run, tmp_path):
    """Rank 1 leaves (os._exit, status 0, so torchrun does not stop rank 0 for it) once loaded: rank 0's
    first collective must fail, not hang (a hang: the launch is killed at its timeout, and the test fails
    with what the ranks printed)."""
    launch, answers = run_worker(
        tmp_path,
        {"llama": tp_run.tp2["LlamaForCausalLM"]},
        tp_run.prompts,
        "--exit-after-load",
        "1",
        env={"XLLM_DIST_TIMEOUT": "5"},
        timeout=90,
    )
    assert launch.returncode != 0, launch.explain()
    assert 1 not in answers  # it left before writing anything
    assert 0 in answers, launch.explain()
    error = answers[0]["error"]
    assert error["type"] and error["message"], error


def test_rank_that_stalls_times_out(tp_run, tmp_path):
    """Rank 1 sleeps once loaded: rank 0's first collective must fail with gloo's timeout error, not hang
    (a hang: the launch is killed at its timeout and the test fails with what the ranks printed). That
    the timeout is XLLM_DIST_TIMEOUT's is test_xllm_dist_timeout_is_the_process_group_timeout's to say:
    timing this run would make a busy machine fail it."""
    launch, answers = run_worker(
        tmp_path,
        {"llama": tp_run.tp2["LlamaForCausalLM"]},
        tp_run.prompts,
        "--stall-after-load",
        "1",
        env={"XLLM_DIST_TIMEOUT": "5"},
        timeout=90,
    )
    assert launch.returncode != 0, launch.explain()
    assert 0 in answers, launch.explain()
    error = answers[0]["error"]
    assert error["type"] and error["message"], error
    # gloo words it by where the wait ran out: "Timed out waiting 5000ms for recv operation to complete"
    # in the collective, "Application timeout caused pair closure" on the connection.
    assert re.search(r"timed out|timeout", error["message"], flags=re.I), error


def test_xllm_dist_timeout_is_the_process_group_timeout(monkeypatch):
    """A rank joins its process group with XLLM_DIST_TIMEOUT seconds as the group's timeout, the time gloo
    lets a collective wait for a peer."""
    import torch.distributed as dist

    from xllm_compiler.runtime.parallel import TensorParallelGroup

    class Joined(Exception):
        """Stops the join once the group is requested: there is no peer to join here."""

    requested: dict = {}

    def init_process_group(**kwargs):
        requested.update(kwargs)
        raise Joined

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "XLLM_DIST_TIMEOUT": "5"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(Joined):
        TensorParallelGroup(2, torch.device("cpu"))
    assert requested == {"backend": "gloo", "timeout": timedelta(seconds=5)}
