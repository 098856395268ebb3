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
    """Follow the child whose token is the target's choice, as deep as it goes.

    target_choice(i): the target's token after node i's path (at T = 0 its argmax); called
    once per output token, root first.
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
    """T > 0: at each accepted node the target samples its own next token (one uniform draw,
    inverse CDF: `sampling.sample_from`); the child holding that token is followed, else the
    sample is the bonus token. Each output token is drawn from exactly the target's processed
    distribution p, so the output is the target's own; a drafted token x is accepted with
    probability p(x) (children: the sum of theirs), as in rejection sampling of
    deterministic candidates.

    Exactly one draw per output token, in order, whatever the tree: with the same generator
    (a request's seed) the text is the same whether 0, 1 or 7 tokens were drafted at each
    step — the same as plain decoding's, up to the target's own numerics.

    target_probs(i): [vocab] float, the target's processed distribution after node i.
    """
    return accept_greedy(tokens, parents, lambda node: sample_from(target_probs(node), rng))
