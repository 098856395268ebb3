"""EAGLE-2 dynamic draft trees, as pure bookkeeping over arrays (no model in scope).

The draft expands the tree level by level: the root's children are the draft's top-k
tokens; at each further level the best top-k nodes of the previous level (by cumulative
log-probability, the *frontier*) are expanded by their own top-k. Every node ever created
is a candidate; the verified tree is the root plus the best `total_tokens − 1` candidates.
Log-probabilities are ≤ 0, so a node never outscores its parent; ranking ties by creation
order puts ancestors first, which keeps every selected node's ancestors selected.
A chain is the same with top_k = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DraftTree:
    """A tree to verify. Node 0 is the root (the target's last token); parents precede
    children. `draft_probs[i]` is the draft's probability of node i given its parent."""

    tokens: list[int]
    parents: list[int]  # -1 for the root
    depths: list[int]  # root: 0
    draft_probs: list[float]  # root: 1.0
    # per node, which proposer made it where several did ("draft", "lookup"); None: the one
    origins: list[str] | None = None

    def origin(self, node: int) -> str | None:
        return None if self.origins is None else self.origins[node]

    @classmethod
    def root_only(cls, token: int) -> DraftTree:
        return cls([token], [-1], [0], [1.0])

    @classmethod
    def chain(cls, tokens: list[int]) -> DraftTree:
        """The root tokens[0] followed by the drafted tokens in a line."""
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), list(range(len(tokens))),
                   [1.0] * len(tokens))

    @property
    def num_drafted(self) -> int:
        return len(self.tokens) - 1

    def path_probs(self) -> list[float]:
        """The proposers' chance of each node's whole path (product of draft_probs)."""
        probs = [1.0] * len(self.tokens)
        for node in range(1, len(self.tokens)):
            probs[node] = probs[self.parents[node]] * self.draft_probs[node]
        return probs

    def best(self, size: int) -> DraftTree:
        """The root and the size − 1 likeliest other nodes. A path's probability never
        exceeds its parent's, and ties go to the earlier node, so ancestors stay in."""
        if size >= len(self.tokens):
            return self
        probs = self.path_probs()
        kept = sorted(sorted(range(len(self.tokens)), key=lambda i: (-probs[i], i))[:size])
        index = {node: position for position, node in enumerate(kept)}
        return DraftTree(tokens=[self.tokens[i] for i in kept],
                         parents=[index[self.parents[i]] if i else -1 for i in kept],
                         depths=[self.depths[i] for i in kept],
                         draft_probs=[self.draft_probs[i] for i in kept],
                         origins=self._origins_of(kept))

    def best_chain(self) -> DraftTree:
        """The root→leaf path with the most expected accepted tokens (the sum of its nodes'
        path probabilities): what a target that verifies only chains gets of this tree."""
        probs = self.path_probs()
        value = list(probs)  # the best sum over a path down from each node
        best_child = [-1] * len(self.tokens)
        for node in range(len(self.tokens) - 1, -1, -1):  # children come after parents
            if best_child[node] >= 0:
                value[node] = probs[node] + value[best_child[node]]
            parent = self.parents[node]
            # ties go to the earlier (better ranked) child, visited later
            if node and (best_child[parent] < 0 or value[node] >= value[best_child[parent]]):
                best_child[parent] = node
        path, node = [0], best_child[0]
        while node >= 0:
            path.append(node)
            node = best_child[node]
        if len(path) == len(self.tokens):
            return self
        return DraftTree(tokens=[self.tokens[i] for i in path],
                         parents=list(range(-1, len(path) - 1)),
                         depths=list(range(len(path))),
                         draft_probs=[self.draft_probs[i] for i in path],
                         origins=self._origins_of(path))

    def _origins_of(self, nodes: list[int]) -> list[str] | None:
        return None if self.origins is None else [self.origins[i] for i in nodes]

    def attention_mask(self) -> np.ndarray:
        """[N, N] bool: node i sees node j iff j is i or one of its ancestors."""
        size = len(self.tokens)
        mask = np.eye(size, dtype=bool)
        for node in range(1, size):
            mask[node] |= mask[self.parents[node]]
        return mask


class TreeBuilder:
    """Collects candidates level by level; `finish` selects the tree to verify."""

    def __init__(self, root_token: int, top_k: int, total_tokens: int) -> None:
        if top_k < 1 or total_tokens < 1:
            raise ValueError("top_k and total_tokens must be at least 1")
        self.top_k = top_k
        self.total_tokens = total_tokens
        # candidate 0 is the root
        self.tokens = [root_token]
        self.parents = [-1]
        self.depths = [0]
        self.log_probs = [0.0]
        self.scores = [0.0]  # cumulative log-probability from the root
        self.origins = ["root"]  # "draft" (add_level) or "lookup" (add_chain's new nodes)

    def add_children(self, parents: list[int], child_tokens: np.ndarray,
                     child_log_probs: np.ndarray) -> list[int]:
        """Record the top-k children of each expanded candidate; return the next frontier.

        parents: [P] candidate ids that were expanded; child_tokens, child_log_probs: [P, k].
        The frontier is the best top_k new candidates (ties: earlier first).
        """
        new_ids = self.add_level(parents, child_tokens, child_log_probs)
        order = sorted(new_ids, key=lambda i: (-self.scores[i], i))
        return order[: self.top_k]

    def add_level(self, parents: list[int], child_tokens: np.ndarray,
                  child_log_probs: np.ndarray) -> list[int]:
        """Record the children as in `add_children`; return all their ids, row by row
        (for a caller that chose the frontier itself)."""
        new_ids = []
        for row, parent in enumerate(parents):
            for token, log_prob in zip(child_tokens[row].tolist(),
                                       child_log_probs[row].tolist(), strict=True):
                new_ids.append(len(self.tokens))
                self.tokens.append(int(token))
                self.parents.append(parent)
                self.depths.append(self.depths[parent] + 1)
                self.log_probs.append(float(log_prob))
                self.scores.append(self.scores[parent] + float(log_prob))
                self.origins.append("draft")
        return new_ids

    def add_chain(self, tokens: list[int], scores: list[float]) -> None:
        """Merge a chain below the root (from another proposer): a token the tree already has
        at that place is shared, keeping the better score; the rest hangs below as new
        candidates. scores[i]: the chain's cumulative log-score up to tokens[i]."""
        node = 0
        for token, score in zip(tokens, scores, strict=True):
            child = next((i for i in range(1, len(self.tokens))
                          if self.parents[i] == node and self.tokens[i] == token), None)
            if child is None:
                child = len(self.tokens)
                self.tokens.append(int(token))
                self.parents.append(node)
                self.depths.append(self.depths[node] + 1)
                self.log_probs.append(float(score - self.scores[node]))
                self.scores.append(float(score))
                self.origins.append("lookup")
            else:  # shared; the chain may make this path likelier
                self.log_probs[child] = max(self.log_probs[child],
                                            float(score - self.scores[node]))
                self.scores[child] = self.scores[node] + self.log_probs[child]
            node = child
        for i in range(1, len(self.tokens)):  # descendants of a raised node rise with it
            self.scores[i] = self.scores[self.parents[i]] + self.log_probs[i]

    def subtree(self, node: int, total_tokens: int) -> tuple[TreeBuilder, dict[int, int]]:
        """The candidates below `node`, with node as the root (scores and depths counted
        from it), selecting total_tokens; and the new id of each kept candidate, by old id.
        (Candidates come after their parents, so one pass finds the descendants.)"""
        below = TreeBuilder(self.tokens[node], self.top_k, total_tokens)
        ids = {node: 0}
        for candidate in range(node + 1, len(self.tokens)):
            parent = ids.get(self.parents[candidate])
            if parent is None:
                continue
            ids[candidate] = len(below.tokens)
            below.tokens.append(self.tokens[candidate])
            below.parents.append(parent)
            below.depths.append(below.depths[parent] + 1)
            below.log_probs.append(self.log_probs[candidate])
            below.scores.append(below.scores[parent] + self.log_probs[candidate])
            below.origins.append(self.origins[candidate])
        return below, ids

    def finish(self) -> DraftTree:
        """The root plus the best total_tokens − 1 candidates, ancestors always included."""
        ranked = sorted(range(1, len(self.tokens)), key=lambda i: (-self.scores[i], i))
        chosen = {0}
        for candidate in ranked:
            if len(chosen) >= self.total_tokens:
                break
            chain = []
            node = candidate
            while node not in chosen:  # ancestors first (they rank higher, but be certain)
                chain.append(node)
                node = self.parents[node]
            if len(chosen) + len(chain) <= self.total_tokens:
                chosen.update(chain)
        order = sorted(chosen, key=lambda i: (self.depths[i], i))  # parents precede children
        index = {candidate: position for position, candidate in enumerate(order)}
        return DraftTree(
            tokens=[self.tokens[i] for i in order],
            parents=[index[self.parents[i]] if i else -1 for i in order],
            depths=[self.depths[i] for i in order],
            draft_probs=[float(np.exp(self.log_probs[i])) for i in order],
            origins=[self.origins[i] for i in order],
        )
