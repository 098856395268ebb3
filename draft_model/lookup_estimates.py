"""How often prompt lookup's proposals come true, learnt from the text that follows them.

Estimates are kept per length of the matched n-gram (a 3-gram match is far more reliable
than a 1-gram one). Every lookup is remembered and scored once the tokens after it are
known, whether or not it was verified — so the estimates keep learning even while nothing
is drafted, and cost nothing to keep.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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

    def survival(self, drafted: int) -> list[float]:
        """P(positions 1..i all accepted), i = 1..drafted."""
        chances, survive = [], 1.0
        for position in range(min(drafted, self.max_positions)):
            survive *= self.rates[position]
            chances.append(survive)
        return chances

    def expected_tokens(self, drafted: int) -> float:
        """E[tokens per step] with `drafted` tokens in a chain: the bonus token plus each
        position that survives."""
        return 1.0 + sum(self.survival(drafted))


@dataclass
class PendingLookup:
    start: int  # index in the text where the proposal's first token would go
    tokens: list[int]
    match_length: int


class LookupEstimates:
    """One AcceptanceEstimate per matched n-gram length 1..max_ngram."""

    def __init__(self, max_ngram: int, max_drafted: int) -> None:
        self.by_match = {n: AcceptanceEstimate(max_drafted) for n in range(1, max_ngram + 1)}

    def remember(self, pending: list[PendingLookup], start: int, proposal: list[int],
                 match_length: int) -> None:
        """Keep a lookup to score once the text after `start` is known."""
        if proposal and match_length:
            pending.append(PendingLookup(start, proposal, match_length))

    def score(self, pending: list[PendingLookup], text: list[int]) -> None:
        """Score every pending lookup the text has decided (a mismatch, or all known)."""
        still = []
        for item in pending:
            actual = text[item.start : item.start + len(item.tokens)]
            matched = 0
            while matched < len(actual) and actual[matched] == item.tokens[matched]:
                matched += 1
            if matched < len(actual) or len(actual) == len(item.tokens):
                self.by_match[item.match_length].observe(len(item.tokens), matched)
            else:
                still.append(item)
        pending[:] = still
