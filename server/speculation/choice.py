"""Per request: the draft model, or prompt lookup alone.

A request served by the draft pays for it before its first drafted token: every prompt token
is read with features (llama.cpp then runs the LM head for each), and the draft takes the
prompt in. Its steps then choose between the draft's tree, the lookup chain and plain
decoding (server/speculation/budget.py). Where the draft's trees seldom
beat the lookup chain — a target whose batched decodes cost nearly linearly, a small model
whose draft is no better than lookup, a slow draft device — a request served by lookup
alone (no features, no draft) is faster.

So each request goes to the mode that has lately served its requests faster, in seconds per
output token from admission to the end; every `explore`-th request goes to the other one,
so a mode that would pay again (other texts, another load) is noticed — only every
4 × `explore`-th while the other one is more than FAR times slower (a large target with a
good draft: lookup alone there would cost a whole request's worth of speed each time). Each
mode is tried first, in order.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.speculation.proposer import Budget, Proposer

FAR = 1.5  # a mode this much slower than the other is retried 4 times less often


@dataclass
class Mode:
    name: str
    proposer: Proposer  # its requests' prompts are read with features if this uses them
    budget: Budget
    seconds_per_token: float | None = None  # moving average over its finished requests
    requests: int = 0


class ProposerChoice:
    def __init__(self, modes: list[Mode], explore: int = 8, weight: float = 0.25) -> None:
        if len(modes) != 2:
            raise ValueError("a choice between two modes")
        self.modes, self.explore, self.weight = modes, explore, weight
        self.picks = 0

    def pick(self) -> Mode:
        self.picks += 1
        untried = [mode for mode in self.modes if mode.seconds_per_token is None]
        if untried:
            return untried[0]
        fast, slow = sorted(self.modes, key=lambda mode: mode.seconds_per_token)
        far = slow.seconds_per_token > FAR * fast.seconds_per_token
        return slow if self.picks % (4 * self.explore if far else self.explore) == 0 else fast

    def observe(self, mode: Mode, seconds: float, tokens: int) -> None:
        """A finished request: its time from admission to the end, its output tokens."""
        if tokens <= 0 or seconds <= 0:
            return
        rate = seconds / tokens
        mode.requests += 1
        previous = mode.seconds_per_token
        mode.seconds_per_token = rate if previous is None else \
            previous + self.weight * (rate - previous)
