"""Incremental detokenizing, stop strings across deltas, and chat templates (sandboxed, from the checkpoint)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from tests.serve.conftest import CHAT_TEMPLATE, TINY_LLAMA, render
from xllm_compiler.artifact.chat_template import ChatTemplate, find_chat_template
from xllm_compiler.artifact.manifest import read_manifest
from xllm_compiler.errors import CheckpointError
from xllm_compiler.serve.chat import ChatRenderer, ChatTemplateError
from xllm_compiler.serve.detokenize import REPLACEMENT, Detokenizer, StopStrings


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(TINY_LLAMA / "tokenizer.json"))


def test_deltas_never_split_a_character_and_join_to_the_whole_text(tokenizer):
    text = "Grüße, 日本語 and ☃ snow"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.split())  # byte-level: some characters take several tokens
    detokenizer = Detokenizer(tokenizer)
    deltas = [detokenizer.add([t]) for t in ids] + [detokenizer.flush()]
    assert not any(REPLACEMENT in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids)


@pytest.mark.parametrize(
    ("deltas", "stops", "sent"),
    [
        (["Hello wo", "rld, bye"], ["world"], "Hello "),
        (["ab", "c", "d"], ["cd"], "ab"),
        (["a<", "/s", "tuff"], ["</s>"], "a</stuff"),  # a held prefix that did not become the stop string
        (["no stop here"], ["zzz"], "no stop here"),
        (["x", "STOP", "more"], ["STOP", "x"], ""),
    ],
)
def test_stop_strings_cut_the_text_even_across_deltas(deltas, stops, sent):
    cut = StopStrings(stops)
    out = "".join(cut.feed(d) for d in deltas) + cut.flush()
    assert out == sent


def test_the_compiled_artifact_carries_the_template(chat_artifact):
    manifest = read_manifest(chat_artifact)
    assert manifest.chat_template in manifest.files
    stored = json.loads((chat_artifact / manifest.chat_template).read_text())
    assert stored == {"template": CHAT_TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"}


def test_a_chat_template_jinja_file_wins_over_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "old", "bos_token": "<s>"}))
    assert find_chat_template(tmp_path) == ChatTemplate("old", "<s>", None)
    (tmp_path / "chat_template.jinja").write_text("new")
    assert find_chat_template(tmp_path) == ChatTemplate("new", "<s>", None)


def test_named_templates_use_the_default_one(tmp_path):
    named = [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert find_chat_template(tmp_path).template == "d"
    assert find_chat_template(tmp_path / "nothing") is None


def test_rendering_follows_hugging_face_conventions():
    renderer = ChatRenderer(ChatTemplate(CHAT_TEMPLATE, "<s>", "</s>"))
    messages = [{"role": "user", "content": "hi"}]
    assert renderer.render(messages) == render(messages)
    with pytest.raises(ChatTemplateError, match="the system message must come first"):
        renderer.render([*messages, {"role": "system", "content": "late"}])
    loops = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content | tojson }}{% endfor %}"
    assert ChatRenderer(ChatTemplate(loops)).render([{"content": "é"}, {"content": "x"}]) == '"é"'


def test_a_template_cannot_reach_python_internals():
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        ChatRenderer(ChatTemplate(escape)).render([])
    mutate = "{{ messages.append(1) }}"
    with pytest.raises(ChatTemplateError):
        ChatRenderer(ChatTemplate(mutate)).render([])


def test_an_unreadable_tokenizer_config_names_the_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json is not valid JSON"):
        find_chat_template(tmp_path)
