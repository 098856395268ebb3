"""Stop strings over streamed text: emit only what can no longer become part of a stop."""

from __future__ import annotations


class StopMatcher:
    """Feed text pieces; get back the text that is safe to emit.

    Text that could be the beginning of a stop string is held back until the next piece
    decides it, so a stop string split across tokens (or across speculative steps) is never
    partly emitted. When a stop string appears, everything from it on is dropped.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text to emit, whether a stop string was found)."""
        self.held += text
        if not self.stops:
            emitted, self.held = self.held, ""
            return emitted, False
        found = [i for i in (self.held.find(stop) for stop in self.stops) if i >= 0]
        if found:
            emitted, self.held = self.held[: min(found)], ""
            return emitted, True
        num_held = self._longest_stop_prefix_suffix()
        cut = len(self.held) - num_held
        emitted, self.held = self.held[:cut], self.held[cut:]
        return emitted, False

    def flush(self) -> str:
        """At the end of generation the held text is no stop string: emit it."""
        emitted, self.held = self.held, ""
        return emitted

    def _longest_stop_prefix_suffix(self) -> int:
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.held)), longest, -1):
                if self.held.endswith(stop[:size]):
                    longest = size
                    break
        return longest
