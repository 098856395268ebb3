"""The adaptive draft budget: per step, how many drafted tokens to verify — zero included.

Expected tokens per second for k drafted tokens in a chain:

    rate(k) = E[tokens | k] / (T_V(k + 1) + T_D(k)),   E[tokens | k] = 1 + Σ_{i≤k} Π_{j≤i} a_j

with T_V the measured verification cost (root included), T_D the drafting cost and a_j the
running (exponential moving average) probability that drafted position j is accepted given
that position j − 1 was. k = 0 is plain decoding: rate(0) = 1 / T_V(1).

For prompt lookup the estimates are kept per length of the matched n-gram and learnt from
every lookup, verified or not, by the lookup proposer (server/speculation/ngram.py,
lookup_estimates.py).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from server.speculation.hybrid import HybridProposer
from server.speculation.lookup_estimates import AcceptanceEstimate, Lookup, LookupEstimates
from server.speculation.ngram import NgramProposer
from server.speculation.tree import DraftTree
from verifier.costs import LiveCosts, VerifyCosts

Costs = VerifyCosts | LiveCosts

MIN_GAIN = 1.1  # speculate only for an expected gain of 10% or more over plain decoding
AHEAD_PROBE = 8  # every 8th tree step tries the other way of drafting (ahead or not)
DEPTH_WINDOW = 16  # drafted steps whose cut trees say how deep the next ones need to grow


def best_length(costs: Costs, acceptance: AcceptanceEstimate, max_drafted: int,
                draft_seconds: Callable[[int], float] = lambda k: 0.0,
                min_gain: float = MIN_GAIN) -> int:
    """The k in 0..max_drafted that maximises expected tokens per second — but k = 0 unless
    the best k is expected to beat plain decoding by min_gain: the estimates are noisy, and
    with a quantized target every verified draft may also move a near-tie
    (docs/how-it-works.md)."""
    plain_rate = 1.0 / costs.of(1)
    best, best_rate = 0, plain_rate
    for k in range(1, max_drafted + 1):
        rate = acceptance.expected_tokens(k) / (costs.of(k + 1) + draft_seconds(k))
        if rate > best_rate:
            best, best_rate = k, rate
    return best if best_rate >= min_gain * plain_rate else 0


def lookup_length(costs: Costs, estimates: LookupEstimates, lookup: Lookup,
                  available: int | None = None, min_gain: float = MIN_GAIN) -> int:
    """How many of a lookup's tokens (the first `available` of them) pay to verify (0
    without a match)."""
    available = len(lookup.tokens) if available is None else min(available, len(lookup.tokens))
    if lookup.match_length == 0 or available == 0:
        return 0
    return best_length(costs, estimates.of(lookup), available, min_gain=min_gain)


class LookupBudget:
    """Budget for prompt lookup: as many of the lookup's tokens as its estimate for that
    kind of match (n-gram length; the request's own context or earlier requests' texts)
    says pay."""

    growth_levels = None

    def __init__(self, costs: Costs, max_drafted: int) -> None:
        self.costs = costs
        self.max_drafted = max_drafted

    def propose(self, proposer: NgramProposer, sequence) -> DraftTree:
        lookup = proposer.lookup(sequence.draft_state, self.max_drafted)
        drafted = lookup_length(self.costs, proposer.estimates, lookup, self.max_drafted)
        return DraftTree.chain([sequence.root_token, *lookup.tokens[:drafted]])

    def expects_tree(self, sequence) -> bool:
        return False  # a lookup is done when the step needs it

    def draft_ahead_due(self, sequence) -> bool:
        return False

    def observe(self, sequence, tree: DraftTree, num_accepted: int) -> None:
        pass  # the lookup proposer scores its lookups itself

    def observe_decode(self, num_tokens: int, seconds: float) -> None:
        self.costs.observe(num_tokens, seconds)


class TreeBudget:
    """Budget for a draft model's trees with prompt lookup grafted in (HybridProposer).

    Per step, one of: the draft's tree, the lookup chain alone, or plain decoding — whichever
    promises the most tokens per second. The tree's rate is measured: tokens per step over
    (T_V(tree size) + the draft's own time). The chain's is estimated before any work (a
    lookup is free). A drafted tree is cut to the size n that maximises
    E[tokens | n] / T_V(n), with E from the proposers' path probabilities, calibrated by how
    many of the predicted tokens the target actually accepted lately. While trees do not pay
    (a slow draft device, a hard text), one is still drafted now and then — at most
    probe_share of the time — so the budget notices when they start to pay again.

    The draft grows only one level deeper than the deepest of the last DEPTH_WINDOW cut
    trees (growth_levels): where verification is dear the cut keeps a few shallow
    nodes, and the levels below them would only be time the step waits for. The one level
    more lets the depth come back when deeper nodes start to make the cut.

    chains: the target verifies chains only (`--exact`): the tree's likeliest chain is cut,
    so that sizes, costs and predictions are those of what is verified.

    Drafting ahead (the next tree grown while the target verifies this one,
    server/speculation/draft_ahead.py) is judged by what a step costs with it and without
    it: measured verification time (a CPU draft slows the target down: they share the
    cores) plus the drafting time the step was exposed to (waiting for a tree drafted
    ahead, or growing one after a wrong guess). Tree steps go the way that has lately
    given more tokens per second; every AHEAD_PROBE-th goes the other way, so a change
    (another load, other texts) is noticed.
    """

    def __init__(self, costs: Costs, probe_share: float = 0.05, weight: float = 0.1,
                 min_gain: float = MIN_GAIN, chains: bool = False,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.costs = costs
        self.chains = chains
        self.clock = clock
        self.probe_share = probe_share
        self.weight = weight
        self.min_gain = min_gain
        self.draft_seconds: float | None = None  # moving average of a tree's drafting time
        self.tree_rate: float | None = None  # moving average of a tree step's tokens/s
        self.predicted, self.accepted = 1.0, 1.0  # moving averages, for calibration
        self.since_probe = 0.0  # modelled seconds of tree-less steps since the last tree
        self.cut_depths: deque[int] = deque(maxlen=DEPTH_WINDOW)
        # moving averages of a tree step's tokens/s, drafting ahead or not
        self.ahead_rate: float | None = None
        self.serial_rate: float | None = None
        self.tree_steps = 0

    @property
    def growth_levels(self) -> int | None:
        return max(self.cut_depths) + 1 if self.cut_depths else None

    def expects_tree(self, sequence) -> bool:
        """After a step that drafted a tree, the next one likely drafts one too."""
        return sequence.budget_step is not None

    def observe_decode(self, num_tokens: int, seconds: float) -> None:
        self.costs.observe(num_tokens, seconds)

    @property
    def calibration(self) -> float:
        """Accepted drafted tokens per token the path probabilities predicted."""
        return self.accepted / self.predicted

    def propose(self, proposer: HybridProposer, sequence) -> DraftTree:
        state, root = sequence.draft_state, sequence.root_token
        lookup = proposer.lookup_chain(state)
        drafted = lookup_length(self.costs, proposer.estimates, lookup, min_gain=self.min_gain)
        pays = self._tree_pays(proposer.estimates, lookup, drafted)
        if pays or self._probe_due():
            started = self.clock()
            tree = proposer.propose(state, root, lookup, levels=self.growth_levels)
            seconds = sequence.launch_seconds + self.clock() - started  # started early too
            self.draft_seconds = self._average(self.draft_seconds, seconds)
            self.since_probe = 0.0
            if self.chains:
                tree = tree.best_chain()
            # a probe verifies one drafted token at least: cut to the root, it would tell
            # nothing, and a calibration gone low could never recover
            tree, predicted = self._cut(tree, min_size=1 if pays else 2)
            sequence.budget_step = (len(tree.tokens), predicted, seconds)
            self.cut_depths.append(max(tree.depths))
            return tree
        self.since_probe += self.costs.of(drafted + 1)
        return DraftTree.chain([root, *lookup.tokens[:drafted]])

    def draft_ahead_due(self, sequence) -> bool:
        if sequence.budget_step is None:
            return False  # a lookup chain or plain step: its successor likely is one too
        self.tree_steps += 1
        if self.ahead_rate is None or self.serial_rate is None:
            return self.ahead_rate is None  # each way measured first
        better = self.ahead_rate >= self.serial_rate
        return better != (self.tree_steps % AHEAD_PROBE == 0)

    def observe(self, sequence, tree: DraftTree, num_accepted: int) -> None:
        step, sequence.budget_step = sequence.budget_step, None
        if step is None:
            return  # a lookup chain or plain step
        size, predicted, seconds = step
        if predicted > 0:
            self.predicted = self._average(self.predicted, predicted)
            self.accepted = self._average(self.accepted, num_accepted)
        rate = (num_accepted + 1) / (self.costs.of(size) + seconds)
        self.tree_rate = self._average(self.tree_rate, rate)
        if sequence.verify_seconds > 0:  # what the step took, as measured
            measured = (num_accepted + 1) / (sequence.verify_seconds + seconds)
            if sequence.drafting_ahead:
                self.ahead_rate = self._average(self.ahead_rate, measured)
            else:
                self.serial_rate = self._average(self.serial_rate, measured)

    def _tree_pays(self, estimates: LookupEstimates, lookup: Lookup, drafted: int) -> bool:
        if self.tree_rate is None:
            return True  # nothing measured yet
        plain_rate = 1.0 / self.costs.of(1)
        chain_rate = plain_rate
        if drafted:
            estimate = estimates.of(lookup)
            chain_rate = estimate.expected_tokens(drafted) / self.costs.of(drafted + 1)
        return self.tree_rate >= max(chain_rate, self.min_gain * plain_rate)

    def _probe_due(self) -> bool:
        seconds = self.draft_seconds or 0.0
        return self.since_probe * self.probe_share >= seconds

    def _cut(self, tree: DraftTree, min_size: int = 1) -> tuple[DraftTree, float]:
        """(the best-rate prefix of the tree by path probability, of min_size nodes at
        least where it has them; its predicted accepted drafted tokens before
        calibration)."""
        probs = sorted(tree.path_probs()[1:], reverse=True)
        scale = self.calibration
        best_size, best_rate, predicted, best_predicted = 1, 1.0 / self.costs.of(1), 0.0, 0.0
        for size, prob in enumerate(probs, start=2):
            predicted += prob
            rate = (1.0 + scale * predicted) / self.costs.of(size)
            if rate > best_rate or best_size < min_size:
                best_size, best_rate, best_predicted = size, rate, predicted
        return tree.best(best_size), best_predicted

    def _average(self, value: float | None, observed: float) -> float:
        return observed if value is None else value + self.weight * (observed - value)
