"""Incremental text for streaming, and stop strings."""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable

REPLACEMENT = "\ufffd"  # what a decoder writes for the bytes of a character that has not fully arrived


class TextStream:
    """Streams text as ids arrive and finds stop strings. Called with each step's new ids; True
    means a stop string appeared. Text that may still turn into a stop string, or that ends in an
    incomplete UTF-8 character (U+FFFD), is held back until it is settled.

    The work per id does not grow with the output. Ids are decoded in a window that starts at the
    previous settled id, as vLLM's and Hugging Face's incremental detokenizers do: a decoder may
    write an id differently at the start of a text (a leading space dropped), and a character's
    bytes may span ids. A stop string is looked for only where it can end in the new text: in the
    tail, the last (longest stop - 1) characters before it and the new text."""

    def __init__(self, tokenizer, stop: tuple[str, ...], on_text: Callable[[str], None] | None,
                 include_stop: bool = False, min_ids: int = 0):
        self.tokenizer, self.stop, self.on_text = tokenizer, stop, on_text
        self.include_stop = include_stop  # the text ends after the stop string rather than before it
        # A stop string counts only where it ends in the text of an id after the first min_ids (min_tokens),
        # as vLLM checks stop strings only once more than min_tokens ids are out.
        self.min_ids = min_ids
        self.ids: list[int] = []
        self.stopped = False
        self.cut_ids = 0
        self.cut_text: str | None = None
        self._hold = max((len(s) - 1 for s in stop), default=0)  # characters that may start a stop string
        self._before_tail: list[str] = []  # the settled text before the tail, in pieces (streamed, if streaming)
        self._tail = ""  # the rest of the settled text: not streamed yet, searched for stop strings
        self._length = 0  # characters of settled text
        self._released = 0  # characters of it before the tail
        self._text_ends: list[int] = []  # self._length after each id
        self._window = 0  # the decoding window's first id
        self._settled = 0  # leading ids whose text is all settled
        self._window_chars = 0  # len(decode(ids[window:settled])): where the unsettled ids' text starts
        self._settled_chars = 0  # self._length when the window last moved

    def __call__(self, new: list[int]) -> bool:
        if self.tokenizer is None or not (self.stop or self.on_text):
            return False
        for token_id in new:
            self._settle(token_id)
        hit = self._first_stop()
        if hit is not None:
            self._cut(*hit)
            return True
        kept = len(self._tail) - min(self._hold, len(self._tail))
        self._release(self._tail[:kept])
        self._tail = self._tail[kept:]
        return False

    def final_text(self, ids: list[int]) -> str:
        if self.cut_text is not None:
            return self.cut_text
        text = self.tokenizer.decode(ids) if self.tokenizer is not None else ""
        if self.on_text is not None and len(text) > self._released:
            self.on_text(text[self._released:])
        return text

    def _settle(self, token_id: int) -> None:
        """Append one id; its text joins the tail up to any incomplete character at the end."""
        self.ids.append(token_id)
        decoded = self.tokenizer.decode(self.ids[self._window:])
        taken = self._length - self._settled_chars  # characters of the unsettled ids already settled
        fresh = decoded[self._window_chars + taken:]
        complete = fresh.rstrip(REPLACEMENT)
        self._tail += complete
        self._length += len(complete)
        if complete == fresh:  # every id is settled: the window moves up to them
            self._window, self._settled = self._settled, len(self.ids)
            self._window_chars = len(self.tokenizer.decode(self.ids[self._window:self._settled]))
            self._settled_chars = self._length
        self._text_ends.append(self._length)

    def _first_stop(self) -> tuple[int, str] | None:
        """The earliest stop string in the tail (of several starting there, the longest), and where it starts."""
        if len(self.ids) <= self.min_ids:
            return None
        early = self._text_ends[self.min_ids - 1] - self._released if self.min_ids else 0  # tail chars too soon
        hits = [(i, -len(s), s) for s, i in ((s, self._tail.find(s, max(early - len(s) + 1, 0))) for s in self.stop)
                if i >= 0]
        if not hits:
            return None
        at, _, stop = min(hits)
        return at, stop

    def _cut(self, at: int, stop: str) -> None:
        """End the text at the stop string (after it, with include_stop), and the ids where their text reaches that."""
        end = at + len(stop) if self.include_stop else at
        self._release(self._tail[:end])
        self.stopped, self.cut_text = True, "".join(self._before_tail)
        chars = len(self.cut_text)
        self.cut_ids = bisect_left(self._text_ends, chars) + 1 if chars else 0

    def _release(self, text: str) -> None:
        """Text that can no longer be part of a stop string: streamed now."""
        if text:
            self._before_tail.append(text)
            self._released += len(text)
            if self.on_text is not None:
                self.on_text(text)
