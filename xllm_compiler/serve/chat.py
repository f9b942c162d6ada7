"""Chat messages to a prompt with the checkpoint's jinja2 chat template, rendered in a sandbox.

A chat template is data that came with a checkpoint: ``ImmutableSandboxedEnvironment`` renders it without
letting it reach Python internals or mutate what it is given. The context follows Hugging Face's conventions so
that templates written for transformers render the same: ``messages``, ``add_generation_prompt``,
``bos_token``/``eos_token``, ``raise_exception``, a ``tojson`` that keeps non-ASCII text, and loop controls.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from xllm_compiler.artifact.chat_template import ChatTemplate, read_chat_template
from xllm_compiler.errors import ArtifactError


class ChatTemplateError(ValueError):
    """The template refused the messages (its ``raise_exception``) or failed to render them."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatRenderer:
    """One compiled template; ``render`` turns messages into the prompt text."""

    def __init__(self, template: ChatTemplate):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        self.template = template
        try:
            self._compiled = env.from_string(template.template)
        except TemplateError as exc:
            raise ChatTemplateError(f"the artifact's chat template does not parse: {exc}") from None

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt for ``messages``, ending where the assistant's reply begins."""
        try:
            return self._compiled.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.template.bos_token or "",
                eos_token=self.template.eos_token or "",
            )
        except ChatTemplateError:
            raise
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template failed on these messages: {exc}") from None


def artifact_renderer(model: Any) -> ChatRenderer | None:
    """The renderer of a loaded model's chat template; None when its checkpoint had none."""
    name = model.manifest.chat_template
    if name is None:
        return None
    try:
        return ChatRenderer(read_chat_template(model.root / name))
    except ChatTemplateError as exc:
        raise ArtifactError(f"{model.root / name}: {exc}") from None
