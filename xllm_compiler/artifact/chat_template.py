"""The checkpoint's chat template, carried into the artifact as chat_template.json for the server to render.

A Hugging Face checkpoint keeps its template in tokenizer_config.json (``chat_template``: a string, or a list
of named templates of which "default" is the one used) or, as newer transformers writes it, in
chat_template.jinja, which then wins. Templates refer to ``bos_token``/``eos_token`` by their text, so those
strings travel with it. The artifact holds data only: the template is rendered by a sandboxed jinja2
environment (xllm_compiler/serve/chat.py), never executed as code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from xllm_compiler.errors import ArtifactError, CheckpointError

CHAT_TEMPLATE_FILE = "chat_template.json"
#: The checkpoint files the template and its token strings come from (they feed the source hash).
TOKENIZER_CONFIG, TEMPLATE_JINJA = "tokenizer_config.json", "chat_template.jinja"


@dataclass(frozen=True)
class ChatTemplate:
    """A jinja2 chat template and the special-token strings it may name."""

    template: str
    bos_token: str | None = None
    eos_token: str | None = None


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken object with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _default_template(value: Any) -> str | None:
    if isinstance(value, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value.strip() else None


def find_chat_template(model_dir: Path) -> ChatTemplate | None:
    """The checkpoint's chat template, or None when it has none; CheckpointError for an unreadable file."""
    config: dict[str, Any] = {}
    if (model_dir / TOKENIZER_CONFIG).is_file():
        try:
            config = json.loads((model_dir / TOKENIZER_CONFIG).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{model_dir / TOKENIZER_CONFIG} is not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{model_dir / TOKENIZER_CONFIG} must hold a JSON object")
    jinja = model_dir / TEMPLATE_JINJA
    template = jinja.read_text() if jinja.is_file() else _default_template(config.get("chat_template"))
    if not template:
        return None
    return ChatTemplate(template, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))


def write_chat_template(model_dir: Path, root: Path) -> str | None:
    """Write the checkpoint's template into the artifact ``root``; the file's name, or None if it has none."""
    template = find_chat_template(model_dir)
    if template is None:
        return None
    (root / CHAT_TEMPLATE_FILE).write_text(json.dumps(asdict(template), indent=2) + "\n")
    return CHAT_TEMPLATE_FILE


def read_chat_template(path: Path) -> ChatTemplate:
    """The template an artifact holds (its file already verified against the manifest's sha256)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not a chat template file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("template"), str):
        raise ArtifactError(f"{path} is not a chat template file (no 'template' string)")
    return ChatTemplate(data["template"], _token_text(data.get("bos_token")), _token_text(data.get("eos_token")))
