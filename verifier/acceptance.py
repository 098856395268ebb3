"""Which drafted tokens the target accepts: pure functions over the tree's arrays.

Vocabulary: a tree's node 0 is the *root* (the target's last token); the draft's other nodes
are *drafted*; the target *accepts* a root→node path and adds one *bonus* token of its own
after it. So every verification step yields ≥ 1 token, and τ = tokens / steps.

The target's choice at a node is given as a callable over node indices, because with
penalties the processed distribution depends on the node's path (computed only where the
walk goes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from verifier.sampling import sample_from


@dataclass(frozen=True)
class Acceptance:
    path: list[int]  # accepted node indices, starting at the root (0)
    bonus_token: int  # the target's own token after the last accepted node

    @property
    def num_accepted(self) -> int:
        """Drafted tokens accepted (the root and the bonus token are not counted)."""
        return len(self.path) - 1


def children_of(parents: Sequence[int]) -> list[list[int]]:
    children: list[list[int]] = [[] for _ in parents]
    for node, parent in enumerate(parents):
        if parent >= 0:
            children[parent].append(node)
    return children


def accept_greedy(tokens: Sequence[int], parents: Sequence[int],
                  target_choice: Callable[[int], int]) -> Acceptance:
    """T = 0: follow the child whose token is the target's argmax, as deep as it goes.

    target_choice(i): the target's argmax token after node i's path.
    """
    children = children_of(parents)
    path = [0]
    while True:
        choice = target_choice(path[-1])
        child = next((c for c in children[path[-1]] if tokens[c] == choice), None)
        if child is None:
            return Acceptance(path, choice)
        path.append(child)


def accept_sampled(tokens: Sequence[int], parents: Sequence[int],
                   target_probs: Callable[[int], np.ndarray],
                   rng: np.random.Generator) -> Acceptance:
    """T > 0: multi-candidate rejection sampling, lossless for deterministic candidates.

    At each accepted node the children are tried in order: child token x is accepted with
    probability p(x) under the target's processed distribution p at that node; a rejected x
    gets p(x) = 0 and p is renormalised before the next child. If all children are
    rejected the bonus token is drawn from what remains. Each output token is then
    distributed exactly as p (the draft's probabilities are not needed: candidates are the
    draft's top-k, not samples). A duplicate candidate has p = 0 by then: always rejected.

    target_probs(i): [vocab] float, the target's processed distribution after node i.
    """
    children = children_of(parents)
    path = [0]
    while True:
        probs = np.array(target_probs(path[-1]), dtype=np.float64)
        accepted = None
        for child in children[path[-1]]:
            token = tokens[child]
            if rng.random() < probs[token]:
                accepted = child
                break
            probs[token] = 0.0
            total = probs.sum()
            if total <= 0.0:
                break
            probs /= total
        if accepted is None:
            return Acceptance(path, sample_from(probs, rng))
        path.append(accepted)
