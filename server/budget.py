"""The adaptive draft budget: per step, how many drafted tokens to verify — zero included.

Expected tokens per second for k drafted tokens in a chain:

    rate(k) = E[tokens | k] / (T_V(k + 1) + T_D(k)),   E[tokens | k] = 1 + Σ_{i≤k} Π_{j≤i} a_j

with T_V the measured verification cost (root included), T_D the drafting cost and a_j the
running (exponential moving average) probability that drafted position j is accepted given
that position j − 1 was. k = 0 is plain decoding: rate(0) = 1 / T_V(1).

For prompt lookup the estimates are kept per length of the matched n-gram (a 3-gram match is
far more reliable than a 1-gram one), and every proposal is scored against the tokens the
target goes on to produce whether or not it was verified — so the estimates keep learning
while the budget says zero, and cost nothing to keep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from draft_model.ngram import NgramProposer
from draft_model.tree import DraftTree
from verifier.costs import VerifyCosts


@dataclass
class AcceptanceEstimate:
    """Per-position conditional acceptance a_1..a_max, as moving averages."""

    max_positions: int
    prior: float = 0.5
    weight: float = 0.1  # of each new observation
    rates: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.rates:
            self.rates = [self.prior] * self.max_positions

    def observe(self, drafted: int, accepted: int) -> None:
        """One proposal: positions 1..accepted were accepted; accepted + 1 (if drafted) not."""
        for position in range(min(accepted + 1, drafted, self.max_positions)):
            hit = 1.0 if position < accepted else 0.0
            self.rates[position] += self.weight * (hit - self.rates[position])

    def expected_tokens(self, drafted: int) -> float:
        """E[tokens per step] with `drafted` tokens in a chain: the bonus token plus each
        position that survives."""
        expected, survive = 1.0, 1.0
        for position in range(min(drafted, self.max_positions)):
            survive *= self.rates[position]
            expected += survive
        return expected


MIN_GAIN = 1.1  # speculate only for an expected gain of 10% or more over plain decoding


def best_length(costs: VerifyCosts, acceptance: AcceptanceEstimate, max_drafted: int,
                draft_seconds: Callable[[int], float] = lambda k: 0.0,
                min_gain: float = MIN_GAIN) -> int:
    """The k in 0..max_drafted that maximises expected tokens per second — but k = 0 unless
    the best k is expected to beat plain decoding by min_gain: the estimates are noisy, and
    with a quantized target every verified draft may also move a near-tie (see README)."""
    plain_rate = 1.0 / costs.of(1)
    best, best_rate = 0, plain_rate
    for k in range(1, max_drafted + 1):
        rate = acceptance.expected_tokens(k) / (costs.of(k + 1) + draft_seconds(k))
        if rate > best_rate:
            best, best_rate = k, rate
    return best if best_rate >= min_gain * plain_rate else 0


@dataclass
class _Pending:
    start: int  # index in the output where the proposal's first token would go
    tokens: list[int]
    bucket: int


class LookupBudget:
    """Budget for prompt lookup, one estimate per matched n-gram length."""

    def __init__(self, costs: VerifyCosts, max_ngram: int, max_drafted: int) -> None:
        self.costs = costs
        self.max_drafted = max_drafted
        self.estimates = {n: AcceptanceEstimate(max_drafted) for n in range(1, max_ngram + 1)}

    def propose(self, proposer: NgramProposer, state, root_token: int,
                pending: list[_Pending], output_length: int) -> DraftTree:
        """Look up a continuation, keep it to score later, verify as much as pays."""
        proposal, match_length = proposer.lookup(state, self.max_drafted)
        self.remember(pending, output_length, proposal, match_length)
        return DraftTree.chain([root_token, *proposal[:self.choose(match_length,
                                                                    len(proposal))]])

    def choose(self, match_length: int, available: int) -> int:
        if match_length == 0 or available == 0:
            return 0
        return best_length(self.costs, self.estimates[match_length],
                           min(available, self.max_drafted))

    def remember(self, pending: list[_Pending], output_length: int, proposal: list[int],
                 match_length: int) -> None:
        """Keep this step's proposal to score once the target's tokens are known."""
        if proposal and match_length:
            pending.append(_Pending(output_length, proposal, match_length))

    def score(self, pending: list[_Pending], output: list[int]) -> None:
        """Score every pending proposal the output has decided (a mismatch, or all known)."""
        still = []
        for item in pending:
            actual = output[item.start : item.start + len(item.tokens)]
            matched = 0
            while matched < len(actual) and actual[matched] == item.tokens[matched]:
                matched += 1
            if matched < len(actual) or len(actual) == len(item.tokens):
                self.estimates[item.bucket].observe(len(item.tokens), matched)
            else:
                still.append(item)
        pending[:] = still
