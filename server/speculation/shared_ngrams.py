"""Prompt lookup across requests: the texts of finished requests, indexed by their n-grams.

A request's own context (server/speculation/ngram.py) knows only what it has seen. Requests to one
server are often alike — the same kind of code, the same boilerplate, one document asked
about again — so the tokens that followed a matching n-gram in an earlier request's prompt
or answer are a second proposal, as llama.cpp's `ngram-mod` keeps one hash pool for all its
slots. It only proposes: the target verifies every token, so the output is the same.

Bounded memory: the last `capacity` tokens of finished texts, oldest texts dropped first,
with their index entries. Keys are the n-grams' hashes; a hit is checked against the stored
tokens, so a hash collision is only a miss.
"""

from __future__ import annotations

from collections import deque

SEPARATOR = -1  # between stored texts: a continuation never runs into the next text


class SharedNgrams:
    def __init__(self, min_ngram: int = 3, max_ngram: int = 8, capacity: int = 1 << 16) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 ≤ min_ngram ≤ max_ngram")
        self.min_ngram, self.max_ngram, self.capacity = min_ngram, max_ngram, capacity
        self.history: list[int] = []  # stored texts, each followed by SEPARATOR
        self.base = 0  # absolute position of history[0]
        self.ends: deque[int] = deque()  # absolute end of each stored text (its separator)
        # hash of an n-gram → absolute position just after its latest occurrence
        self.index: dict[int, int] = {}

    @property
    def num_tokens(self) -> int:
        return len(self.history) - len(self.ends)

    def add(self, tokens: list[int]) -> None:
        """Store a finished text (prompt and output); drop the oldest texts beyond capacity."""
        tokens = list(tokens[-self.capacity:])
        if len(tokens) <= self.min_ngram:
            return
        start = self.base + len(self.history)
        self.history.extend(tokens)
        self.history.append(SEPARATOR)
        self.ends.append(start + len(tokens))
        for key, position in self._ngrams(tokens, start):
            self.index[key] = position
        while self.num_tokens > self.capacity:
            self._drop_oldest()

    def lookup(self, context: list[int], limit: int) -> tuple[list[int], int]:
        """(up to `limit` tokens that followed the longest suffix of `context` found in a
        stored text, that suffix's length); ([], 0) if none."""
        if limit <= 0:
            return [], 0
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            suffix = context[-n:]
            position = self.index.get(hash(tuple(suffix)))
            if position is None:
                continue
            at = position - self.base
            if self.history[at - n : at] != suffix:
                continue  # another n-gram with the same hash
            continuation = self.history[at : at + limit]
            if SEPARATOR in continuation:
                continuation = continuation[: continuation.index(SEPARATOR)]
            if continuation:
                return continuation, n
        return [], 0

    def _ngrams(self, tokens: list[int], start: int):
        """(hash, absolute position after it) of every n-gram of a text that a token follows."""
        for end in range(self.min_ngram, len(tokens)):
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                yield hash(tuple(tokens[end - n : end])), start + end

    def _drop_oldest(self) -> None:
        end = self.ends.popleft()
        count = end + 1 - self.base  # the text and its separator
        for key, position in self._ngrams(self.history[: count - 1], self.base):
            if self.index.get(key) == position:  # not since overwritten by a later text
                del self.index[key]
        del self.history[:count]
        self.base += count
