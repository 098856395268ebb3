"""The DGF draft's tree, extended by prompt lookup.

Each step the request's own context (and, with a shared pool, earlier requests' texts) is
searched for the longest earlier occurrence of its last tokens (draft_model/ngram.py); the
tokens that followed are merged into the draft's candidate tree as a chain, where the draft
already has a token it is shared. Draft candidates are ranked by their cumulative draft
log-probability (EAGLE-2), lookup tokens by the log of their estimated chance of surviving
to that depth, learnt per kind of match (n-gram length, source) from every lookup
(draft_model/lookup_estimates.py) — so the verified budget of `total_tokens` goes to
whichever proposer's tokens are likelier to be accepted. On code, which repeats identifiers
and whole lines, lookup often knows the continuation the draft is unsure of.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from draft_model.lookup_estimates import LookupEstimates, PendingLookup
from draft_model.ngram import Lookup, NgramProposer, NgramState
from draft_model.proposer import DraftState, Proposer
from draft_model.tree import DraftTree

FLOOR = 1e-6  # a lookup token's survival chance is never taken as exactly zero


@dataclass
class HybridState:
    draft: DraftState
    lookup: NgramState
    pending: list[PendingLookup] = field(default_factory=list)


class HybridProposer:
    def __init__(self, draft: Proposer, lookup: NgramProposer) -> None:
        self.draft = draft
        self.lookup = lookup
        self.estimates = LookupEstimates(lookup.max_tokens)

    @property
    def shape(self):
        return self.draft.shape

    @property
    def growth_depth(self) -> int | None:
        return self.draft.growth_depth

    @growth_depth.setter
    def growth_depth(self, depth: int | None) -> None:
        self.draft.growth_depth = depth

    def new_state(self, capacity: int, key: int | None = None) -> HybridState:
        return HybridState(self.draft.new_state(capacity, key), self.lookup.new_state(capacity))

    def release(self, state: HybridState, key: int | None = None) -> None:
        self.draft.release(state.draft, key)
        self.lookup.release(state.lookup, key)

    def reusable(self, key: int, prompt_tokens: list[int], kept: int) -> int:
        return self.draft.reusable(key, prompt_tokens, kept)

    def begin(self, state: HybridState, prompt_tokens: list[int], prompt_features: np.ndarray,
              root_token: int) -> None:
        self.draft.begin(state.draft, prompt_tokens, prompt_features, root_token)
        self.lookup.begin(state.lookup, prompt_tokens, prompt_features, root_token)

    def commit(self, state: HybridState, path_features: np.ndarray,
               next_tokens: list[int]) -> None:
        self.draft.commit(state.draft, path_features, next_tokens)
        self.lookup.commit(state.lookup, path_features, next_tokens)
        self.estimates.score(state.pending, state.lookup.tokens)

    def launch(self, state: HybridState) -> None:
        self.draft.launch(state.draft)

    def lookup_chain(self, state: HybridState) -> Lookup:
        """The lookup's continuation, remembered for scoring."""
        limit = min(self.lookup.max_tokens, self.draft.shape.total_tokens - 1)
        lookup = self.lookup.lookup(state.lookup, limit)
        self.estimates.remember(state.pending, len(state.lookup.tokens), lookup)
        return lookup

    def propose(self, state: HybridState, root_token: int,
                lookup: Lookup | None = None) -> DraftTree:
        """The draft's tree with the lookup chain merged in (looked up here unless given)."""
        if lookup is None:
            lookup = self.lookup_chain(state)
        if not lookup.tokens:
            return self.draft.propose(state.draft, root_token)
        survival = self.estimates.of(lookup).survival(len(lookup.tokens))
        scores = [math.log(max(chance, FLOOR)) for chance in survival]
        return self.draft.propose(state.draft, root_token, graft=(lookup.tokens, scores))
