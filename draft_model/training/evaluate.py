"""Offline acceptance: replay the engine's draft → verify loop against recorded greedy text.

For a sequence the target itself produced greedily (prompt, then answer) together with the
target's features, the target's verdict on any draft is known without running it: a drafted
token is accepted iff it equals the next recorded token. Replaying the proposer over the
answer gives the mean accepted length τ (tokens per verification step, bonus included) and
per-position acceptance, exactly as the engine would see them with this target numerics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from server.speculation.proposer import Proposer
from server.speculation.tree import DraftTree
from verifier.acceptance import accept_greedy


@dataclass
class AcceptanceStats:
    steps: int = 0
    tokens: int = 0  # accepted drafted tokens + one bonus token per step
    accepted_at: list[int] = field(default_factory=list)  # [d]: steps accepting ≥ d+1 tokens

    @property
    def tau(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    def per_position(self) -> list[float]:
        """P(the d-th drafted token is accepted | the (d−1)-th was), d = 1, 2, …"""
        rates, previous = [], self.steps
        for count in self.accepted_at:
            rates.append(count / previous if previous else 0.0)
            previous = count
        return rates

    def add(self, accepted: int) -> None:
        self.steps += 1
        self.tokens += accepted + 1
        while len(self.accepted_at) < accepted:
            self.accepted_at.append(0)
        for depth in range(accepted):
            self.accepted_at[depth] += 1

    def merge(self, other: AcceptanceStats) -> None:
        self.steps += other.steps
        self.tokens += other.tokens
        for depth, count in enumerate(other.accepted_at):
            if depth < len(self.accepted_at):
                self.accepted_at[depth] += count
            else:
                self.accepted_at.append(count)

    def to_dict(self) -> dict:
        return {"tau": round(self.tau, 4), "steps": self.steps, "tokens": self.tokens,
                "per_position_acceptance": [round(r, 4) for r in self.per_position()]}


def accepted_length(tree: DraftTree, continuation: np.ndarray) -> tuple[int, list[int]]:
    """Greedy verification against known text, by the serving engine's own rule: the
    target's choice after a node at depth d is continuation[d]. (accepted count, accepted
    node indices)."""
    def known_choice(node: int) -> int:
        depth = tree.depths[node]
        return int(continuation[depth]) if depth < len(continuation) else -1

    path = accept_greedy(tree.tokens, tree.parents, known_choice).path[1:]
    return len(path), path


def replay(proposer: Proposer, tokens: np.ndarray, features: np.ndarray, answer_start: int,
           max_new_tokens: int | None = None) -> AcceptanceStats:
    """tokens [N], features [N, H] of prompt + greedy answer; the answer starts at
    answer_start (the target's first generated token, the first root)."""
    stats = AcceptanceStats()
    end = len(tokens) if max_new_tokens is None else min(len(tokens),
                                                         answer_start + max_new_tokens)
    if answer_start < 1 or answer_start >= end:
        return stats
    state = proposer.new_state(len(tokens) + 1)
    proposer.begin(state, tokens[:answer_start].tolist(), features[:answer_start],
                   int(tokens[answer_start]))
    root = answer_start  # index of the root token in `tokens`
    while root + 1 < end:
        tree = proposer.propose(state, int(tokens[root]))
        accepted, _ = accepted_length(tree, tokens[root + 1:end])
        accepted = min(accepted, end - root - 2)  # keep a bonus token inside the answer
        stats.add(accepted)
        next_root = root + accepted + 1
        proposer.commit(state, features[root:next_root],
                        tokens[root + 1:next_root + 1].tolist())
        root = next_root
    return stats
