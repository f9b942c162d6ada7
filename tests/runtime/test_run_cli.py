"""xllm-run: one line of comma-separated new token ids per --prompt-ids, completion text per --prompt."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import xllm_compiler
from xllm_compiler.run import main

TINY_LLAMA = Path(__file__).resolve().parents[2] / "tools" / "tiny-llama"


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prompt_ids_print_one_line_of_new_ids(small_artifact, small_model, capsys):
    code, out, _ = run_main(capsys, small_artifact, "--prompt-ids", "1,2,3", "--max-new-tokens", "5")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 1 and out.endswith("\n")
    tokens = [int(t) for t in lines[0].split(",")]
    assert len(tokens) == 5
    # eos is honoured by default; this prompt's greedy continuation must not contain it for the 5-token check.
    assert tokens == small_model.generate([[1, 2, 3]], max_new_tokens=5)[0]
    assert lines[0] == ",".join(map(str, small_model.generate([[1, 2, 3]], max_new_tokens=5, ignore_eos=True)[0]))


def test_repeated_prompt_ids_print_one_line_each(small_artifact, small_model, capsys):
    prompts = [[1, 2, 3], [7], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57]]
    argv = [small_artifact, "--max-new-tokens", "6", "--ignore-eos"]
    for p in prompts:
        argv += ["--prompt-ids", ",".join(map(str, p))]
    code, out, _ = run_main(capsys, *argv)
    assert code == 0
    expected = small_model.generate(prompts, max_new_tokens=6, ignore_eos=True)
    assert out.splitlines() == [",".join(map(str, tokens)) for tokens in expected]


def test_sampling_flags(small_artifact, small_model, capsys):
    argv = [small_artifact, "--prompt-ids", "5,6", "--max-new-tokens", "8", "--temperature", "1.0", "--seed", "3"]
    code, out, _ = run_main(capsys, *argv, "--ignore-eos")
    assert code == 0
    expected = small_model.generate([[5, 6]], max_new_tokens=8, temperature=1.0, seed=3, ignore_eos=True)[0]
    assert out == ",".join(map(str, expected)) + "\n"


@pytest.mark.parametrize("speculative", ["ngram", "draft"])
def test_speculative_flags_print_the_plain_tokens(small_artifact, small_model, capsys, speculative):
    prompt = [9, 4, 9, 4, 9, 4, 9]
    draft = str(small_artifact) if speculative == "draft" else speculative  # its own draft: all kept
    argv = [small_artifact, "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "8", "--ignore-eos"]
    code, out, _ = run_main(capsys, *argv, "--speculative", draft, "--num-speculative-tokens", "2")
    assert code == 0
    assert out == ",".join(map(str, small_model.generate([prompt], max_new_tokens=8, ignore_eos=True)[0])) + "\n"


def test_python_dash_m_prints_the_same_line(small_artifact, small_model):
    argv = [str(small_artifact), "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--ignore-eos"]
    result = subprocess.run(
        [sys.executable, "-m", "xllm_compiler.run", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    expected = small_model.generate([[1, 2, 3]], max_new_tokens=5, ignore_eos=True)[0]
    assert result.stdout == ",".join(map(str, expected)) + "\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt-ids", "1,x,3"], "--prompt-ids must be comma-separated integers"),
        (["--prompt-ids", "1,99999"], "outside"),
        (["--prompt", "hello"], "tokenizer"),
        (["--prompt-ids", "1,2", "--speculative", "medusa"], "--speculative medusa: not 'ngram'"),
        (["--prompt-ids", "1,2", "--speculative", "ngram", "--num-speculative-tokens", "0"], "num_speculative_tokens"),
    ],
)
def test_bad_requests_exit_2_with_one_line(small_artifact, capsys, argv, message):
    code, out, err = run_main(capsys, small_artifact, *argv, "--max-new-tokens", "2")
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


def test_missing_prompt_is_a_usage_error(small_artifact, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(small_artifact)])
    assert info.value.code == 2


@pytest.fixture(scope="module")
def tiny_llama_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-llama") / "artifact"
    xllm_compiler.compile(TINY_LLAMA, out, decode_buckets=[1, 2], prefill_buckets=[16], max_seq_len=64)
    return out


def test_text_prompt_on_the_bundled_model(tiny_llama_artifact, capsys):
    model = xllm_compiler.load(tiny_llama_artifact)
    texts = ["The quick brown fox", "Once upon a time"]
    expected = [model.decode(t) for t in model.generate([model.encode(s) for s in texts], max_new_tokens=8)]
    argv = [tiny_llama_artifact, "--max-new-tokens", "8"]
    for s in texts:
        argv += ["--prompt", s]
    code, out, err = run_main(capsys, *argv)
    assert code == 0, err
    assert out == "".join(text + "\n" for text in expected)
    assert out.strip()
