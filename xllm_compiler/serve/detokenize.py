"""Tokens to text as they stream: deltas that never split a character, and stop strings caught across deltas.

A byte-level tokenizer may spend several tokens on one character, and most decoders look at a token's
neighbours (a leading space, a merged byte): decoding each token alone is wrong. ``Detokenizer`` decodes a short
window of recent tokens and emits only what the window adds once it no longer ends in an incomplete character
(U+FFFD), so the deltas join to the text of the whole sequence. ``StopStrings`` holds back the tail that could
still become a stop string, so no text at or after a stop string is ever sent.
"""

from __future__ import annotations

from typing import Any

#: What a decoder returns for bytes that do not (yet) form a whole UTF-8 character.
REPLACEMENT = "\ufffd"


class Detokenizer:
    """Incremental decoding of one sequence's new tokens with a ``tokenizers.Tokenizer``."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._prefix = 0  # window start: tokens before it are settled text
        self._read = 0  # tokens whose text has been emitted

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.tokens[start:end], skip_special_tokens=True)

    def add(self, tokens: list[int]) -> str:
        """Append ``tokens``; the text they complete (possibly empty while a character is unfinished)."""
        self.tokens += tokens
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of the sequence: whatever text is still held back, incomplete characters included."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self.tokens):
            return ""
        settled = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix, len(self.tokens))
        if not final and (len(text) <= len(settled) or text.endswith(REPLACEMENT)):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return text[len(settled) :]


class StopStrings:
    """Cuts a stream of text deltas at the first stop string; the stop string itself is never returned."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """The part of ``delta`` (with what was held back) that is safe to send now."""
        if self.stopped:
            return ""
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[: min(hits)]
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """At the end of the stream: the held tail was not a stop string after all."""
        held, self._held = ("" if self.stopped else self._held), ""
        return held

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-n:]):
                    longest = n
                    break
        return longest
