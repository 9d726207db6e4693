"""Incremental text for streaming, and stop strings."""
from __future__ import annotations

from collections.abc import Callable


class TextStream:
    """Streams text as ids arrive and finds stop strings. Called with each step's new ids; True
    means a stop string appeared. Text that may still turn into a stop string, or that ends in an
    incomplete UTF-8 character (U+FFFD), is held back until it is settled."""

    def __init__(self, tokenizer, stop: tuple[str, ...], on_text: Callable[[str], None] | None,
                 include_stop: bool = False):
        self.tokenizer, self.stop, self.on_text = tokenizer, stop, on_text
        self.include_stop = include_stop  # the text ends after the stop string rather than before it
        self.ids: list[int] = []
        self.emitted = 0  # characters of text already streamed
        self.stopped = False
        self.cut_ids = 0
        self.cut_text: str | None = None

    def __call__(self, new: list[int]) -> bool:
        if self.tokenizer is None or not (self.stop or self.on_text):
            return False
        self.ids.extend(new)
        text = self.tokenizer.decode(self.ids)
        hits = [(i, -len(s), s) for s, i in ((s, text.find(s)) for s in self.stop) if i >= 0]
        if hits:
            at, _, stop = min(hits)  # the earliest; of several starting there, the longest
            end = at + len(stop) if self.include_stop else at
            self.stopped, self.cut_text = True, text[:end]
            self.cut_ids = self._ids_covering(end)
            self._emit(self.cut_text)
            return True
        # Hold back a possible stop-string prefix and an incomplete UTF-8 character.
        hold = max((len(s) - 1 for s in self.stop), default=0)
        safe = text[: len(text) - hold] if hold else text
        self._emit(safe.rstrip("\ufffd"))
        return False

    def final_text(self, ids: list[int]) -> str:
        if self.cut_text is not None:
            return self.cut_text
        text = self.tokenizer.decode(ids) if self.tokenizer is not None else ""
        self._emit(text)
        return text

    def _emit(self, text: str) -> None:
        if self.on_text is not None and len(text) > self.emitted:
            self.on_text(text[self.emitted:])
            self.emitted = len(text)

    def _ids_covering(self, chars: int) -> int:
        """Fewest leading ids whose text reaches `chars` characters (the ids kept before a stop)."""
        for n in range(len(self.ids) + 1):
            if len(self.tokenizer.decode(self.ids[:n])) >= chars:
                return n
        return len(self.ids)
