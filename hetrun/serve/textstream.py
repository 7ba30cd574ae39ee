"""Token ids to text as they arrive: incremental detokenisation and stop strings.

Decoding every token on its own breaks multi-byte characters and the spacing rules of real tokenizers, and decoding
the whole sequence at each step costs O(n^2). TextStream decodes a short window (the tokens since the last complete
piece of text) and holds back text that ends in an unfinished UTF-8 character, or that could be the start of a stop
string, until the next token decides it. The text it emits, joined, is the text of the whole sequence cut at the
first stop string.
"""

from __future__ import annotations


class TextStream:
    """Feed it token ids; it returns the text that is final so far and notices stop strings."""

    def __init__(self, tokenizer, stop: "list[str] | tuple[str, ...]" = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # decoded so far (emitted text plus held-back text)
        self.emitted = 0  # characters of self.text already returned
        self.stopped = False  # a stop string was found; self.text ends right before it
        self._prefix = 0  # self.ids[_prefix:_read] decode to text already in self.text; the window starts there
        self._read = 0

    def push(self, new_ids: "list[int]") -> str:
        """Add the next token ids; returns the newly final text (maybe empty). Nothing more after a stop string."""
        if self.stopped or not new_ids:
            return ""
        self.ids.extend(new_ids)
        self._decode_window()
        self._check_stop()
        return self._take(final=False)

    def finish(self) -> str:
        """The text held back, once no token will follow (an unfinished character decodes as U+FFFD)."""
        if not self.stopped and self._read < len(self.ids):
            before = self._decode(self._prefix, self._read)
            self.text += self._decode(self._prefix, len(self.ids))[len(before):]
            self._read = len(self.ids)
            self._check_stop()
        return self._take(final=True)

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True)

    def _decode_window(self) -> None:
        before = self._decode(self._prefix, self._read)
        window = self._decode(self._prefix, len(self.ids))
        if len(window) > len(before) and not window.endswith("\ufffd"):
            self.text += window[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def _check_stop(self) -> None:
        if not self.stop:
            return
        # Emitted text holds no stop string, nor the start of one (_held_back kept that back): search after it.
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _take(self, final: bool) -> str:
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._held_back()
        piece = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return piece

    def _held_back(self) -> int:
        """Characters at the end of the text that could begin a stop string (emitting them could be wrong)."""
        tail = self.text[self.emitted:]
        for n in range(min(len(tail), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.stop):
                return n
        return 0
