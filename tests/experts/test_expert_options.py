"""Bad expert-parallel and placement input on the CLI: one stderr line naming the problem, exit 2, no OUT_DIR
or staging folder left behind. (Each is refused while planning, before any weight is read.)"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.cli_calls import assert_one_line, call
from tests.test_bad_input import SMALL_ARGS, assert_nothing_left
from xllm_compiler import cli

#: Qwen3-MoE's tiny config has 8 experts.
BAD_EP = {
    "ep-not-dividing": ("Qwen3MoeForCausalLM", ["--ep", "3"], ["--ep 3", "8 experts"]),
    "ep-on-dense-model": ("LlamaForCausalLM", ["--ep", "2"], ["--ep 2", "LlamaForCausalLM", "no experts"]),
    "ep-zero": ("Qwen3MoeForCausalLM", ["--ep", "0"], ["ep", "0"]),
    "tp-with-ep": ("Qwen3MoeForCausalLM", ["--tp", "2", "--ep", "2"], ["--tp 2", "--ep 2"]),
}


@pytest.mark.parametrize("architecture, args, fragments", BAD_EP.values(), ids=BAD_EP.keys())
def test_compile_refuses_bad_expert_parallel_cli(checkpoints, tmp_path, capsys, architecture, args, fragments):
    model_dir, _ = checkpoints.checkpoint(architecture)
    out = tmp_path / "out"
    rc, stdout, err = call(cli.main, [model_dir, out, "--quiet", "--no-cache", *SMALL_ARGS, *args], capsys)
    assert rc == 2
    assert stdout == ""
    assert_one_line(err, "xllm-compile", "error:", *fragments)
    assert_nothing_left(out)


#: STATS.json contents (or raw text) -> what the one line must name. The tiny Qwen3-MoE has 2 MoE layers of 8.
GOOD_LAYER = [5, 1, 0, 3, 9, 2, 2, 7]
BAD_STATS = {
    "not-json": ("{layers", ["not valid JSON"]),
    "not-an-object": ([1, 2], ["must hold"]),
    "no-layers": ({"tokens": 3}, ["must hold"]),
    "tokens-missing": ({"layers": [GOOD_LAYER, GOOD_LAYER]}, ["'tokens'"]),
    "negative-count": ({"layers": [GOOD_LAYER, [-1, *GOOD_LAYER[1:]]], "tokens": 9}, ["layer 1", "-1"]),
    "float-count": ({"layers": [GOOD_LAYER, [0.5, *GOOD_LAYER[1:]]], "tokens": 9}, ["layer 1", "0.5"]),
    "wrong-layer-count": ({"layers": [GOOD_LAYER], "tokens": 9}, ["1 layers", "2 MoE layers"]),
    "wrong-expert-count": ({"layers": [GOOD_LAYER, GOOD_LAYER[:4]], "tokens": 9}, ["layer 1", "4 experts", "8"]),
}


@pytest.mark.parametrize("content, fragments", BAD_STATS.values(), ids=BAD_STATS.keys())
def test_compile_refuses_bad_stats_cli(checkpoints, tmp_path, capsys, content, fragments):
    model_dir, _ = checkpoints.checkpoint("Qwen3MoeForCausalLM")
    stats = tmp_path / "stats.json"
    stats.write_text(content if isinstance(content, str) else json.dumps(content))
    out = tmp_path / "out"
    args = [model_dir, out, "--quiet", "--no-cache", *SMALL_ARGS, "--ep", "2", "--expert-placement", stats]
    rc, stdout, err = call(cli.main, args, capsys)
    assert rc == 2
    assert stdout == ""
    assert_one_line(err, "xllm-compile", "error:", str(stats), *fragments)
    assert_nothing_left(out)


BAD_PLACEMENT = {
    "placement-without-ep": (["--expert-placement", "{stats}"], ["--expert-placement", "needs --ep"]),
    "redundant-without-placement": (["--ep", "2", "--redundant-experts", "2"], ["--redundant-experts 2", "needs"]),
    "slots-not-dividing": (
        ["--ep", "2", "--expert-placement", "{stats}", "--redundant-experts", "3"],
        ["--redundant-experts 3", "11 slots", "--ep 2"],
    ),
    "negative-redundant": (["--ep", "2", "--expert-placement", "{stats}", "--redundant-experts", "-1"], ["-1"]),
    "missing-stats-file": (["--ep", "2", "--expert-placement", "{missing}"], ["cannot be read"]),
}


@pytest.mark.parametrize("args, fragments", BAD_PLACEMENT.values(), ids=BAD_PLACEMENT.keys())
def test_compile_refuses_bad_placement_cli(checkpoints, tmp_path, capsys, args, fragments):
    model_dir, _ = checkpoints.checkpoint("Qwen3MoeForCausalLM")
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"layers": [GOOD_LAYER, GOOD_LAYER], "tokens": 31}))
    args = [a.format(stats=stats, missing=tmp_path / "missing.json") for a in args]
    out = tmp_path / "out"
    rc, stdout, err = call(cli.main, [model_dir, out, "--quiet", "--no-cache", *SMALL_ARGS, *args], capsys)
    assert rc == 2
    assert stdout == ""
    assert_one_line(err, "xllm-compile", "error:", *fragments)
    assert_nothing_left(out)


def test_compile_refuses_top_k_above_the_expert_count_cli(checkpoints, tmp_path, capsys):
    model_dir, _ = checkpoints.checkpoint("MixtralForCausalLM")
    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 5}))
    out = tmp_path / "out"
    rc, _, err = call(cli.main, [bad, out, "--quiet", "--no-cache", *SMALL_ARGS, "--ep", "2"], capsys)
    assert rc == 2
    assert_one_line(err, "xllm-compile", "error:", "num_experts_per_tok 5", "expert count 4")
    assert_nothing_left(out)


def test_ep_artifact_without_torchrun_is_refused_naming_ep(checkpoints, monkeypatch):
    """Loading an --ep 2 artifact in a plain process: one error naming the layout and the torchrun to use."""
    import xllm_compiler
    from xllm_compiler.errors import InputError

    for variable in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(variable, raising=False)
    model_dir, _ = checkpoints.checkpoint("MixtralForCausalLM")
    artifact = checkpoints.artifact(model_dir, ep=2, decode_buckets=[1], prefill_buckets=[16], max_seq_len=64)
    with pytest.raises(InputError, match=r"expert-parallel \(ep=2\): run it under torchrun --nproc-per-node 2"):
        xllm_compiler.load(artifact)
