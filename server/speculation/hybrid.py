"""The DGF draft's tree, extended by prompt lookup.

Each step the request's own context (and, with a shared pool, earlier requests' texts) is
searched for the longest earlier occurrence of its last tokens (server/speculation/ngram.py); the
tokens that followed are merged into the draft's candidate tree as a chain, where the draft
already has a token it is shared. Draft candidates are ranked by their cumulative draft
log-probability (EAGLE-2), lookup tokens by the log of their estimated chance of surviving
to that depth, learnt per kind of match (n-gram length, source) from every lookup
(server/speculation/lookup_estimates.py) — so the verified budget of `total_tokens` goes to
whichever proposer's tokens are likelier to be accepted. On code, which repeats identifiers
and whole lines, lookup often knows the continuation the draft is unsure of.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from server.speculation.draft_proposer import DraftProposer, DraftState, TreeShape
from server.speculation.lookup_estimates import Lookup, LookupEstimates
from server.speculation.ngram import NgramProposer, NgramState
from server.speculation.tree import DraftTree

FLOOR = 1e-6  # a lookup token's survival chance is never taken as exactly zero


@dataclass
class HybridState:
    draft: DraftState
    lookup: NgramState


class HybridProposer:
    uses_features = True
    source = "draft"  # (its lookup chain is merged into the draft's tree)

    def __init__(self, draft: DraftProposer, lookup: NgramProposer) -> None:
        self.draft = draft
        self.lookup = lookup

    @property
    def shape(self) -> TreeShape:
        return self.draft.shape

    @property
    def estimates(self) -> LookupEstimates:
        """How often lookups come true, kept by the lookup proposer."""
        return self.lookup.estimates

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
        self.lookup.begin(state.lookup, prompt_tokens, None, root_token)

    def commit(self, state: HybridState, path_features: np.ndarray,
               next_tokens: list[int]) -> None:
        self.draft.commit(state.draft, path_features, next_tokens)
        self.lookup.commit(state.lookup, path_features, next_tokens)

    def launch(self, state: HybridState, levels: int | None = None) -> None:
        self.draft.launch(state.draft, levels)

    @property
    def pipelined(self) -> bool:
        return self.draft.pipelined

    def draft_ahead(self, state: HybridState, tree: DraftTree, levels: int | None = None) -> bool:
        return self.draft.draft_ahead(state.draft, tree, levels)

    def settle(self, state: HybridState, next_tokens: list[int],
               verified: tuple[float, float] | None = None):
        return self.draft.settle(state.draft, next_tokens, verified)

    def lookup_chain(self, state: HybridState) -> Lookup:
        """The lookup's continuation, as long as a tree can hold."""
        limit = min(self.lookup.max_tokens, self.draft.shape.total_tokens - 1)
        return self.lookup.lookup(state.lookup, limit)

    def propose(self, state: HybridState, root_token: int, lookup: Lookup | None = None,
                levels: int | None = None) -> DraftTree:
        """The draft's tree (`levels` deep at most) with the lookup chain merged in (looked
        up here unless given)."""
        if lookup is None:
            lookup = self.lookup_chain(state)
        if not lookup.tokens:
            return self.draft.propose(state.draft, root_token, levels=levels)
        survival = self.estimates.of(lookup).survival(len(lookup.tokens))
        scores = [math.log(max(chance, FLOOR)) for chance in survival]
        return self.draft.propose(state.draft, root_token, graft=(lookup.tokens, scores),
                                  levels=levels)
