"""Does a tokenizer.json fit the model? Checked at compile time (a warning) and before ``xllm-run --prompt``
loads any weights (an error), so that a mismatch costs neither a load nor a silent empty completion.

The tokenizer fits when its ids cover the model's vocabulary: none at or above ``vocab_size`` (the
model could not embed them) and at most a little padding below it. Checkpoints round the embedding up
(Qwen2.5: 151,936 rows for 151,665 tokens; DeepSeek-V3: 129,280 for 128,815); a tokenizer that covers
much less than that was copied from another model, and the ids the model generates past its end
decode to nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

#: How much of the model's vocabulary may lie past the tokenizer's last id (embedding padding).
MAX_PADDING_FRACTION = 0.02

Status = Literal["ok", "missing", "unreadable", "mismatch"]


@dataclass(frozen=True)
class TokenizerCheck:
    """What ``check_tokenizer`` found; ``problem`` says it in words when ``status`` is not "ok"."""

    file: str
    status: Status
    model_vocab_size: int
    vocab_size: int | None = None
    """One past the tokenizer's largest id (added tokens included); None when it could not be read."""
    problem: str | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)
    """The loaded ``tokenizers.Tokenizer``, so that a caller need not read it again."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        """The compile report's "tokenizer" section."""
        return {
            "file": self.file if self.status != "missing" else None,
            "status": self.status,
            "vocab_size": self.vocab_size,
            "model_vocab_size": self.model_vocab_size,
            "problem": self.problem,
        }


def check_tokenizer(path: Path, model_vocab_size: int) -> TokenizerCheck:
    """Read ``path`` (a tokenizer.json) and compare its ids with ``model_vocab_size``; never raises."""
    path = Path(path)
    if not path.is_file():
        return TokenizerCheck(path.name, "missing", model_vocab_size, problem=f"there is no {path}")
    from tokenizers import Tokenizer  # only when there is one: it is not needed to compile

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exceptions for malformed files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return TokenizerCheck(path.name, "unreadable", model_vocab_size, problem=f"{path} cannot be read: {first_line}")
    vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    problem = _mismatch(path, vocab_size, model_vocab_size)
    status: Status = "mismatch" if problem else "ok"
    return TokenizerCheck(path.name, status, model_vocab_size, vocab_size, problem, tokenizer)


def _mismatch(path: Path, vocab_size: int, model_vocab_size: int) -> str | None:
    if vocab_size > model_vocab_size:
        return (
            f"{path} does not match the model: its ids reach {vocab_size - 1}, past the model's vocab_size "
            f"{model_vocab_size}"
        )
    if model_vocab_size - vocab_size > MAX_PADDING_FRACTION * model_vocab_size:
        return (
            f"{path} does not match the model: it covers {vocab_size} of the model's {model_vocab_size} token "
            f"ids, so most generated ids would decode to nothing"
        )
    return None
