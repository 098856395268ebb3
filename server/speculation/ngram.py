"""Prompt lookup: propose the tokens that followed the last n tokens where they occurred
before in the request's own context (prompt and output so far). Nearly free — no model,
no features — and strong on code, which repeats identifiers and whole lines.

The longest suffix (max_ngram tokens down to min_ngram) with an earlier occurrence wins;
among its occurrences the most recent one. The proposal is a chain.

Up to 5-grams by default: the longer the match, the more reliable its continuation (counts
in docs/results.md), and the budget learns a separate acceptance estimate per match length.

With a shared pool (shared_ngrams.py) the texts of earlier requests are searched too; the
longer match wins (this request's own on a tie), and its estimates are kept apart from the
own context's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.speculation.lookup_estimates import Lookup, LookupEstimates, PendingLookup
from server.speculation.shared_ngrams import SharedNgrams
from server.speculation.tree import DraftTree


@dataclass
class NgramState:
    tokens: list[int] = field(default_factory=list)  # the context, the root included
    # n-gram (as a tuple) → the index just after its latest occurrence, for every n
    index: dict[tuple[int, ...], int] = field(default_factory=dict)
    pending: list[PendingLookup] = field(default_factory=list)  # lookups not yet scored


class NgramProposer:
    """Every lookup is remembered and scored once the text after it is known, verified or
    not: `estimates` (per kind of match) is what the budgets and the hybrid's ranking
    read."""

    uses_features = False
    source = "lookup"

    def __init__(self, max_ngram: int = 5, min_ngram: int = 1, max_tokens: int = 8,
                 shared: SharedNgrams | None = None) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 ≤ min_ngram ≤ max_ngram")
        self.max_ngram, self.min_ngram, self.max_tokens = max_ngram, min_ngram, max_tokens
        self.shared = shared  # earlier requests' texts, or None: this request's own only
        self.estimates = LookupEstimates(max_tokens)

    def new_state(self, capacity: int, key: int | None = None) -> NgramState:
        return NgramState()

    def release(self, state: NgramState, key: int | None = None) -> None:
        """A finished request's text goes to the shared pool (if any) for later requests."""
        if self.shared is not None:
            self.shared.add(state.tokens)

    def reusable(self, key: int, prompt_tokens: list[int], kept: int) -> int:
        """All of it: the lookup indexes the whole prompt's tokens and needs no features."""
        return kept

    def begin(self, state: NgramState, prompt_tokens: list[int], prompt_features,
              root_token: int) -> None:
        self._extend(state, [*prompt_tokens, root_token])

    def commit(self, state: NgramState, path_features, next_tokens: list[int]) -> None:
        self._extend(state, next_tokens)
        self.estimates.score(state.pending, state.tokens)

    def launch(self, state: NgramState, levels: int | None = None) -> None:
        """Nothing to start ahead: a lookup is done when the step needs it."""

    def propose(self, state: NgramState, root_token: int,
                max_tokens: int | None = None) -> DraftTree:
        """A chain of up to max_tokens drafted tokens after the root (the context's end)."""
        limit = self.max_tokens if max_tokens is None else max_tokens
        return DraftTree.chain([root_token, *self.lookup(state, limit).tokens])

    def lookup(self, state: NgramState, limit: int) -> Lookup:
        """The tokens after the latest earlier occurrence of the context's longest matching
        suffix: in its own context, or in the shared pool where that match is longer."""
        lookup = self._search(state, limit)
        self.estimates.remember(state.pending, len(state.tokens), lookup)
        return lookup

    def _search(self, state: NgramState, limit: int) -> Lookup:
        if limit <= 0:
            return Lookup()
        own = self._own_lookup(state, limit)
        if self.shared is not None and own.match_length < self.shared.max_ngram:
            tokens, length = self.shared.lookup(state.tokens, limit)
            if length > own.match_length:
                return Lookup(tokens, length, shared=True)
        return own

    def _own_lookup(self, state: NgramState, limit: int) -> Lookup:
        tokens = state.tokens
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            start = state.index.get(tuple(tokens[-n:]))
            if start is not None:
                return Lookup(tokens[start : start + limit], n)
        return Lookup()

    def _extend(self, state: NgramState, new_tokens: list[int]) -> None:
        """Append tokens; index every n-gram that now has a successor."""
        tokens = state.tokens
        for token in new_tokens:
            tokens.append(token)
            end = len(tokens) - 1  # the new token's index: it follows the n-grams ending here
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end - n < 0:
                    break
                state.index[tuple(tokens[end - n : end])] = end
