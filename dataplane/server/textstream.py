"""OpenAI `stop` strings, matched on streamed text.

The engine only knows token ids; the server turns them into text as they
arrive (the tokenizer's incremental detokenizer), and `StopStringMatcher`
holds back only the tail that could still become a stop string, so a stream
never shows the client text that a later token reveals to be the start of a
stop sequence.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Find the first stop string in streamed text; release only text that cannot start one.

        m = StopStringMatcher(["\\n\\n"])
        m.push("Hello\\n")  -> ("Hello", False)     # "\\n" is held back
        m.push("\\nWorld")  -> ("", True)            # stopped; "\\n\\nWorld" is never shown
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""  # everything pushed, including held-back text
        self._released = 0  # chars of `text` already returned
        self.stopped = False

    def push(self, delta: str) -> tuple[str, bool]:
        """Add text; return (text safe to show now, whether a stop string was found)."""
        if self.stopped:
            return "", True
        self.text += delta
        if not self.stops:
            return self._release(len(self.text)), False
        # A stop string cannot start before `_released`: such a start would have been held back.
        hits = [i for i in (self.text.find(s, self._released) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits)), True
        return self._release(len(self.text) - self._partial_suffix_len()), False

    def flush(self) -> str:
        """At the end of generation: the held-back tail (it never became a stop string)."""
        return "" if self.stopped else self._release(len(self.text))

    @property
    def released_text(self) -> str:
        return self.text[: self._released]

    def _partial_suffix_len(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text) - self._released), best, -1):
                if self.text.endswith(stop[:k]):
                    best = k
                    break
        return best

    def _release(self, end: int) -> str:
        end = max(end, self._released)
        out = self.text[self._released : end]
        self._released = end
        return out
