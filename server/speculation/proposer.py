"""The two interfaces the engine drafts through: a Proposer makes trees for one sequence at
a time, a Budget decides per step how much of a proposal the target verifies.

Vocabulary: the *root* is the last token the target chose (emitted, not yet in its KV
cache); *drafted* tokens are proposed below it; the target *accepts* a root→node path and
adds its own *bonus* token, which becomes the next root.

Implementations: DraftProposer (the DGF draft model's trees, draft_proposer.py),
NgramProposer (prompt lookup, ngram.py) and HybridProposer (lookup merged into the draft's
tree, hybrid.py); FullBudget (always the whole proposal, here), LookupBudget and TreeBudget
(budget.py).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from server.speculation.tree import DraftTree


class Proposer(Protocol):
    # whether it reads the target's features: its requests' prompts are read with them
    uses_features: bool
    source: str  # the name of its accepted tokens' origin: "draft" or "lookup"

    def new_state(self, capacity: int, key: int | None = None) -> Any:
        """The state of one sequence of up to `capacity` tokens in target slot `key`."""

    def release(self, state: Any, key: int | None = None) -> None:
        """The sequence is done; keep what is worth keeping for the slot's next one."""

    def reusable(self, key: int, prompt_tokens: list[int], kept: int) -> int:
        """How many of the `kept` prompt tokens the target holds from an earlier request in
        slot `key` this proposer can take without their features."""

    def begin(self, state: Any, prompt_tokens: list[int], prompt_features: np.ndarray | None,
              root_token: int) -> None:
        """After the target read the prompt: its features [n, H] for the last n prompt
        tokens (None where uses_features is off), and the first root."""

    def commit(self, state: Any, path_features: np.ndarray, next_tokens: list[int]) -> None:
        """The target accepted a path: its features at the root and the accepted nodes
        [m + 1, H], next_tokens the m accepted tokens plus the bonus token."""

    def launch(self, state: Any, levels: int | None = None) -> None:
        """Start the next tree now (where drafting can run ahead; else nothing)."""

    def propose(self, state: Any, root_token: int) -> DraftTree:
        """A tree below root_token; node 0 is the root."""


class Budget(Protocol):
    def propose(self, proposer: Any, sequence: Any) -> DraftTree:
        """This step's tree for the sequence: all, part or none of the proposal."""

    def expects_tree(self, sequence: Any) -> bool:
        """Whether the sequence's next step likely drafts a tree (worth launching now)."""

    @property
    def growth_levels(self) -> int | None:
        """Levels a draft tree should grow (None: the proposer's full depth)."""

    def draft_ahead_due(self, sequence: Any) -> bool:
        """Whether the next tree should grow while this step's tree is verified (for a
        proposer that can draft ahead)."""

    def observe(self, sequence: Any, tree: DraftTree, num_accepted: int) -> None:
        """A verified step of the sequence."""

    def observe_decode(self, num_tokens: int, seconds: float) -> None:
        """One target decode that verified num_tokens tree nodes and nothing else."""


class FullBudget:
    """No budget: every step verifies the proposer's whole proposal."""

    growth_levels = None

    def propose(self, proposer: Proposer, sequence: Any) -> DraftTree:
        return proposer.propose(sequence.draft_state, sequence.root_token)

    def expects_tree(self, sequence: Any) -> bool:
        return True

    def draft_ahead_due(self, sequence: Any) -> bool:
        return True

    def observe(self, sequence: Any, tree: DraftTree, num_accepted: int) -> None:
        pass

    def observe_decode(self, num_tokens: int, seconds: float) -> None:
        pass
