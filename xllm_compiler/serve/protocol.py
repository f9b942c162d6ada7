"""The request bodies of /v1/completions and /v1/chat/completions, as OpenAI defines them (the part we serve).

Types are strict (``"0.5"`` is not a temperature), so a wrongly typed field is a 400 naming it; fields OpenAI
has and we do not serve are accepted only at their neutral value (``echo`` false, ``n`` 1, no logprobs), and
other unknown fields are ignored, as OpenAI's own server does with fields of newer clients.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Fields we accept only at the value that changes nothing, each with that value.
UNSUPPORTED_UNLESS: dict[str, tuple[Any, ...]] = {
    "echo": (False,),
    "n": (1,),
    "best_of": (1,),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Strict):
    """What completions and chat share."""

    model: str | None = None
    """The served model's name; None (absent) means the one model this server has."""
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False
    """An extension (as vLLM names it): each choice also carries its ``token_ids``."""
    n: int = 1

    def unsupported(self) -> str | None:
        """The first field set to a value we do not serve, if any."""
        given = {**(self.model_extra or {}), "n": self.n}
        return next((k for k, ok in UNSUPPORTED_UNLESS.items() if k in given and given[k] not in ok), None)

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingFields):
    prompt: Any
    """A string, a list of token ids, or a list of either (one choice each); checked by ``prompts``."""
    max_tokens: int = Field(16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        if isinstance(value, str) or _is_ids(value):
            return value
        if isinstance(value, list) and value and all(isinstance(p, str) or _is_ids(p) for p in value):
            return value
        raise ValueError("must be a string, a list of token ids, or a non-empty list of either")

    def prompts(self) -> list[str | list[int]]:
        """One entry per choice: a text, or token ids."""
        return [self.prompt] if isinstance(self.prompt, str) or _is_ids(self.prompt) else list(self.prompt)


def _is_ids(value: Any) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


class TextPart(_Strict):
    type: str
    text: str = ""


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: content a string (text parts joined)."""
        message = {**(self.model_extra or {}), "role": self.role}
        if isinstance(self.content, list):
            if any(part.type != "text" for part in self.content):
                raise ValueError("only text content parts are supported")
            message["content"] = "".join(part.text for part in self.content)
        else:
            message["content"] = self.content or ""
        return message


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name for max_tokens; either caps the reply, by default at what max_seq_len leaves."""
