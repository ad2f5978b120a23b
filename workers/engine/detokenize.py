"""Incremental detokenization with stop strings: each call returns the new text delta.

Decodes a short window (previous chunk + new tokens) and emits the difference, so tokenizers that merge
bytes or strip leading spaces still produce correct text; an incomplete UTF-8 sequence ("\\ufffd") waits
for the next token. With stop strings, the last len(longest stop)-1 characters are held back until they
cannot begin a stop string; the text stops right before the first stop string.
"""
from __future__ import annotations

from typing import Any

WINDOW_PREFIX = 5  # prompt tokens that give the first output token its context


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any | None, prompt_ids: list[int], stop: tuple[str, ...] = ()):
        self.tok = tokenizer
        self.ids: list[int] = list(prompt_ids[-WINDOW_PREFIX:])
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""  # all decoded output text
        self.emitted = 0  # characters of self.text already returned
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, new_ids: list[int]) -> tuple[str, bool]:
        """-> (text delta, whether a stop string was hit)."""
        if self.tok is None or self.stopped:
            return "", self.stopped
        self.ids.extend(new_ids)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        if self.stop:
            lo = max(0, self.emitted - self.hold)
            hits = [i for i in (self.text.find(s, lo) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                self.text = self.text[:cut]
                self.stopped = True
                return self._emit(len(self.text)), True
            return self._emit(len(self.text) - self.hold), False
        return self._emit(len(self.text)), False

    def flush(self) -> str:
        """Text held back for stop-string matching, at the end of the request."""
        return "" if self.tok is None else self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out
