"""How often prompt lookup's proposals come true, learnt from the text that follows them.

Estimates are kept per length of the matched n-gram (a 3-gram match is far more reliable
than a 1-gram one) and per source (the request's own context, or earlier requests' texts).
Every lookup is remembered and scored once the tokens after it are known, whether or not it
was verified — so the estimates keep learning even while nothing is drafted, and cost
nothing to keep.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Lookup:
    """A lookup's proposal: the tokens after the matched n-gram, and where they came from."""

    tokens: list[int] = field(default_factory=list)
    match_length: int = 0  # 0: nothing matched
    shared: bool = False  # found in an earlier request's text, not this request's own

    @property
    def key(self) -> tuple[bool, int]:
        """What the acceptance estimates are kept per."""
        return self.shared, self.match_length


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
    lookup: Lookup


class LookupEstimates:
    """One AcceptanceEstimate per kind of match (Lookup.key), made when first needed."""

    def __init__(self, max_drafted: int) -> None:
        self.max_drafted = max_drafted
        self.by_match: dict[tuple[bool, int], AcceptanceEstimate] = {}

    def of(self, lookup: Lookup) -> AcceptanceEstimate:
        key = lookup.key
        if key not in self.by_match:
            self.by_match[key] = AcceptanceEstimate(self.max_drafted)
        return self.by_match[key]

    def remember(self, pending: list[PendingLookup], start: int, lookup: Lookup) -> None:
        """Keep a lookup to score once the text after `start` is known."""
        if lookup.tokens and lookup.match_length:
            pending.append(PendingLookup(start, lookup))

    def score(self, pending: list[PendingLookup], text: list[int]) -> None:
        """Score every pending lookup the text has decided (a mismatch, or all known)."""
        still = []
        for item in pending:
            proposal = item.lookup.tokens
            actual = text[item.start : item.start + len(proposal)]
            matched = 0
            while matched < len(actual) and actual[matched] == proposal[matched]:
                matched += 1
            if matched < len(actual) or len(actual) == len(proposal):
                self.of(item.lookup).observe(len(proposal), matched)
            else:
                still.append(item)
        pending[:] = still
