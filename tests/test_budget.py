"""Prompt lookup and the adaptive draft budget: pure logic on synthetic costs and
acceptance, then exactness on the real (F16) target."""

from __future__ import annotations

import pytest

from server.engine import Engine
from server.engine.sequence import Sequence
from server.speculation.budget import (
    DEPTH_WINDOW,
    LookupBudget,
    TreeBudget,
    best_length,
    lookup_length,
)
from server.speculation.choice import Mode, ProposerChoice
from server.speculation.lookup_estimates import AcceptanceEstimate, LookupEstimates
from server.speculation.ngram import Lookup, NgramProposer
from server.speculation.shared_ngrams import SharedNgrams
from server.speculation.tree import DraftTree
from tests.conftest import make_target
from verifier.costs import LiveCosts, VerifyCosts, measure_verify_costs
from verifier.sampling import SamplingParams


def state_with(proposer, tokens):
    state = proposer.new_state(100)
    proposer.begin(state, tokens[:-1], None, tokens[-1])
    return state


def test_lookup_takes_the_longest_suffix_and_its_latest_occurrence():
    proposer = NgramProposer(max_ngram=3, max_tokens=4)
    # (7, 1, 2) occurs once before; (1, 2) occurs twice, latest followed by 8
    state = state_with(proposer, [7, 1, 2, 3, 4, 1, 2, 8, 9, 7, 1, 2])
    assert proposer.lookup(state, 4) == Lookup([3, 4, 1, 2], 3)
    state = state_with(proposer, [5, 1, 2, 3, 4, 1, 2, 8, 9, 6, 1, 2])
    assert proposer.lookup(state, 3) == Lookup([8, 9, 6], 2)
    assert proposer.lookup(state_with(proposer, [1, 2, 3, 4]), 4) == Lookup()
    tree = proposer.propose(state, root_token=2, max_tokens=2)
    assert tree.tokens == [2, 8, 9] and tree.parents == [-1, 0, 1]


def test_lookup_index_grows_with_commits_as_if_built_at_once():
    proposer = NgramProposer(max_ngram=3)
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8]
    grown = state_with(proposer, tokens[:5])
    for start in range(5, len(tokens), 3):
        proposer.commit(grown, None, tokens[start:start + 3])
    at_once = state_with(proposer, tokens)
    assert grown.tokens == at_once.tokens and grown.index == at_once.index
    assert proposer.lookup(grown, 3) == proposer.lookup(at_once, 3) == Lookup([4, 6, 2], 2)


def test_the_shared_pool_proposes_what_followed_in_earlier_requests():
    pool = SharedNgrams(min_ngram=2, max_ngram=4, capacity=100)
    proposer = NgramProposer(max_ngram=3, max_tokens=4, shared=pool)
    proposer.release(state_with(proposer, [1, 2, 3, 4, 5, 6, 7]))  # a finished request
    # nothing in its own context, (3, 4, 5) in the earlier text: up to the text's end
    assert proposer.lookup(state_with(proposer, [9, 3, 4, 5]), 4) == \
        Lookup([6, 7], 3, shared=True)
    # a tie (own (5, 6) → 8, the pool's (5, 6) → 7): the request's own
    own = state_with(proposer, [5, 6, 8, 0, 5, 6])
    assert proposer.lookup(own, 4) == Lookup([8, 0, 5, 6], 2)
    longer = state_with(proposer, [3, 8, 2, 3, 4])  # own (3,) → 8; pool (2, 3, 4) → 5, 6, 7
    assert proposer.lookup(longer, 2) == Lookup([5, 6], 3, shared=True)
    alone = NgramProposer(max_ngram=3, max_tokens=4)  # no pool: its own context only
    assert alone.lookup(state_with(alone, [9, 3, 4, 5]), 4) == Lookup()


def test_the_shared_pool_forgets_its_oldest_texts_and_checks_every_hit():
    pool = SharedNgrams(min_ngram=2, max_ngram=3, capacity=10)
    pool.add([1, 2, 3, 4, 5, 6])
    pool.add([7, 8, 3, 4, 9, 10])  # (3, 4) now continues with 9
    assert pool.lookup([3, 4], 5) == ([9, 10], 2)
    assert pool.num_tokens == 6 and pool.lookup([1, 2], 3) == ([], 0)  # the first is gone
    fresh = SharedNgrams(min_ngram=2, max_ngram=3, capacity=10)
    fresh.add([7, 8, 3, 4, 9, 10])
    assert pool.index == {key: position + pool.base for key, position in fresh.index.items()}
    pool.add([11, 12, 13, 14, 15])
    assert pool.lookup([7, 8], 5) == ([], 0) and pool.lookup([11, 12], 5) == ([13, 14, 15], 2)
    # a hash shared with another n-gram is a miss, not the other n-gram's continuation
    pool.index[hash((50, 51))] = pool.index[hash((11, 12))]
    assert pool.lookup([50, 51], 5) == ([], 0)
    long = SharedNgrams(min_ngram=2, max_ngram=3, capacity=4)
    long.add(list(range(20)))  # longer than the pool: its last tokens
    assert long.num_tokens == 4 and long.lookup([16, 17], 5) == ([18, 19], 2)


def test_expected_tokens_follow_the_per_position_rates():
    estimate = AcceptanceEstimate(4, rates=[0.8, 0.5, 0.5, 0.0])
    assert estimate.expected_tokens(0) == 1.0
    assert estimate.expected_tokens(2) == pytest.approx(1 + 0.8 + 0.4)
    assert estimate.expected_tokens(4) == pytest.approx(1 + 0.8 + 0.4 + 0.2)
    estimate = AcceptanceEstimate(3, prior=0.5, weight=0.5)
    estimate.observe(drafted=3, accepted=1)  # position 1 hit, 2 missed, 3 never reached
    assert estimate.rates == [0.75, 0.25, 0.5]


LINEAR = VerifyCosts({1: 0.010, 2: 0.020, 4: 0.040, 8: 0.080})  # compute-bound: no gain
FLAT = VerifyCosts({1: 0.010, 2: 0.0105, 4: 0.011, 8: 0.012, 16: 0.016})  # nearly free
TWO_CORE_Q4 = VerifyCosts({1: 0.0109, 2: 0.0192, 4: 0.0285, 8: 0.0457})  # measured, docs


def test_budget_chooses_zero_when_speculation_loses():
    sure = AcceptanceEstimate(8, prior=0.99)
    assert best_length(LINEAR, sure, 8) == 0  # every token costs as much as plain
    so_so = AcceptanceEstimate(8, prior=0.6)
    assert best_length(TWO_CORE_Q4, so_so, 8) == 0
    assert best_length(FLAT, AcceptanceEstimate(8, prior=0.0), 8) == 0
    # a gain too small to trust: 1.1 expected tokens for 1.05x the cost
    slight = VerifyCosts({1: 0.010, 2: 0.0105})
    assert best_length(slight, AcceptanceEstimate(1, prior=0.1), 1) == 0
    assert best_length(slight, AcceptanceEstimate(1, prior=0.1), 1, min_gain=1.0) == 1


def test_budget_grows_with_flat_verification_and_good_acceptance():
    good = AcceptanceEstimate(15, prior=0.9)
    assert best_length(FLAT, good, 15) >= 8
    assert best_length(TWO_CORE_Q4, AcceptanceEstimate(8, prior=0.95), 8) >= 2
    assert best_length(FLAT, AcceptanceEstimate(15, prior=0.3), 15) < best_length(FLAT, good, 15)
    # a drafting cost per token pushes the choice down
    assert best_length(FLAT, good, 15, draft_seconds=lambda k: 0.004 * k) < \
        best_length(FLAT, good, 15)


def test_lookup_estimates_score_proposals_against_what_the_target_produced():
    estimates = LookupEstimates(max_drafted=4)
    pending = []
    estimates.remember(pending, start=2, lookup=Lookup([7, 8, 9], 3))
    estimates.remember(pending, start=2, lookup=Lookup([5], 0))  # no match: skip
    estimates.remember(pending, start=2, lookup=Lookup([7, 6], 3, shared=True))
    estimates.score(pending, [1, 2, 7])
    assert len(pending) == 2  # 7 matched, what follows it is not yet known
    estimates.score(pending, [1, 2, 7, 8, 4])
    assert pending == []
    rates = estimates.of(Lookup([7, 8, 9], 3)).rates
    assert rates[0] > 0.5 and rates[1] > 0.5 and rates[2] < 0.5 and rates[3] == 0.5
    # the shared pool's 3-gram matches are learnt apart from the request's own
    assert estimates.of(Lookup([7, 6], 3, shared=True)).rates[:3] == \
        pytest.approx([0.55, 0.45, 0.5])
    assert lookup_length(FLAT, estimates, Lookup([7, 8, 9], 0)) == 0


def test_the_lookup_proposer_learns_from_each_lookup_once_the_text_is_known():
    proposer = NgramProposer(max_ngram=3, max_tokens=4)
    state = proposer.new_state(64)
    proposer.begin(state, [1, 2, 3, 4, 1, 2], None, 3)
    assert proposer.lookup(state, 4).tokens == [4, 1, 2, 3]  # after "1 2 3" at the start
    proposer.commit(state, None, [4, 1, 9])  # two came true, the third did not
    assert state.pending == []
    rates = proposer.estimates.of(Lookup([4], 3)).rates
    assert rates[:3] == pytest.approx([0.55, 0.55, 0.45]) and rates[3] == 0.5


@pytest.fixture(scope="module")
def chain_target(f16_model):
    target = make_target(f16_model, num_slots=1, max_tree_nodes=8, max_tree_branches=1,
                         features=False)
    yield target
    target.close()


REPEAT = "Repeat this list exactly three times: apple, banana, cherry, date, elderberry."


def generate(engine, text, max_new=48):
    prompt = engine.target.tokenizer.encode(
        engine.target.chat_template.render([{"role": "user", "content": text}]))
    sequence = Sequence(prompt, SamplingParams(temperature=0), max_new, [], sink=lambda e: None)
    engine.submit(sequence)
    while not sequence.is_finished:
        engine.step()
    return sequence


def test_prompt_lookup_output_equals_plain_decoding(chain_target):
    plain = generate(Engine(chain_target), REPEAT)
    fixed = generate(Engine(chain_target, NgramProposer(max_tokens=7)), REPEAT)
    assert fixed.num_drafted > 0 and fixed.num_accepted > 0
    assert fixed.output_tokens == plain.output_tokens
    costs = measure_verify_costs(chain_target, sizes=(1, 2, 4, 8), context=64, repeats=2)
    assert set(costs.seconds) == {1, 2, 4, 8} and chain_target.num_free_slots == 1
    proposer = NgramProposer(max_tokens=7)
    budget = LookupBudget(costs, max_drafted=7)
    adaptive = generate(Engine(chain_target, proposer, budget=budget), REPEAT)
    assert adaptive.output_tokens == plain.output_tokens
    assert any(rate != 0.5 for e in proposer.estimates.by_match.values()
               for rate in e.rates)  # learnt


def test_a_repeated_request_is_drafted_from_the_shared_pool(chain_target):
    text = "Write a haiku about the sea."
    plain = generate(Engine(chain_target), text)
    pool = SharedNgrams()
    engine = Engine(chain_target, NgramProposer(max_tokens=7, shared=pool))
    first, second = generate(engine, text), generate(engine, text)
    assert first.output_tokens == second.output_tokens == plain.output_tokens
    # each text: prompt and output (and what the last step verified past max_tokens)
    length = len(first.prompt_tokens) + len(first.output_tokens)
    assert 2 * length <= pool.num_tokens <= 2 * (length + 7)
    # the second answer is the first one: the pool proposes it whole
    assert second.num_accepted >= len(plain.output_tokens) - 8 > first.num_accepted
    costs = measure_verify_costs(chain_target, sizes=(1, 2, 4, 8), context=64, repeats=2)
    budget = LookupBudget(costs, max_drafted=7)
    proposer = NgramProposer(max_tokens=7, shared=pool)
    budgeted = Engine(chain_target, proposer, budget=budget)
    assert generate(budgeted, text).output_tokens == plain.output_tokens
    assert any(rate > 0.5 for (shared, _), e in proposer.estimates.by_match.items() if shared
               for rate in e.rates)  # learnt from the pool's proposals


def test_the_engine_times_its_decodes_into_live_costs(chain_target):
    plain = generate(Engine(chain_target), REPEAT)
    # a profile far from this machine (a second per token, verifying 8 hardly dearer): the
    # decodes the engine times replace it, and the budget stops trusting it
    costs = LiveCosts(VerifyCosts({1: 1.0, 8: 1.05}), window=1000, min_count=4, refresh=4)
    proposer = NgramProposer(max_tokens=7)
    budget = LookupBudget(costs, max_drafted=7)
    adaptive = generate(Engine(chain_target, proposer, budget=budget), REPEAT)
    assert adaptive.output_tokens == plain.output_tokens
    # every decode step is timed, the prompt's step is not (its tokens are no tree)
    assert costs.num_observed == adaptive.num_verify_steps - 1
    assert costs.of(1) < 0.5 and costs.current != costs.profile


class FakeHybrid:
    """A HybridProposer stand-in: a fixed lookup chain and a fixed draft tree that takes
    `draft_seconds` of the fake clock to draft."""

    def __init__(self, clock, draft_seconds, tree_probs, chain=(), match_length=0,
                 chain_rate=0.5):
        self.clock, self.draft_seconds = clock, draft_seconds
        self.chain = Lookup(list(chain), match_length)
        self.estimates = LookupEstimates(max_drafted=8)
        self.estimates.of(self.chain).rates = [chain_rate] * 8
        self.tree = DraftTree.chain([0, *range(1, len(tree_probs) + 1)])
        self.tree = DraftTree(self.tree.tokens, self.tree.parents, self.tree.depths,
                              [1.0, *tree_probs])
        self.trees = 0
        self.growth_depth = None  # asked by the budget: the chain stops there, as growth does

    def lookup_chain(self, state):
        return self.chain

    def propose(self, state, root, lookup, levels=None):
        self.clock.now += self.draft_seconds
        self.trees += 1
        self.growth_depth = levels
        if levels is None:
            return self.tree
        return self.tree.best(levels + 1)  # a chain: its first levels


class FakeClock:
    now = 0.0

    def __call__(self):
        return self.now


def run_budget(budget, proposer, steps, accepted=lambda tree: tree.num_drafted):
    sizes = []
    sequence = Sequence([1], SamplingParams(temperature=0), 8, [], sink=lambda e: None)
    sequence.root_token = 0
    for _ in range(steps):
        tree = budget.propose(proposer, sequence)
        sizes.append(len(tree.tokens))
        budget.observe(sequence, tree, accepted(tree))
    return sizes


def test_tree_budget_keeps_a_fast_draft_and_cuts_the_tree_to_the_costs():
    clock = FakeClock()
    probs = [0.9] * 15  # a chain the target accepts whole
    fast = FakeHybrid(clock, 0.0005, probs)
    sizes = run_budget(TreeBudget(FLAT, clock=clock), fast, 50)
    assert fast.trees == 50 and min(sizes[5:]) >= 10  # nearly free to verify: keep most
    steep = FakeHybrid(clock, 0.0005, probs)
    sizes = run_budget(TreeBudget(TWO_CORE_Q4, clock=clock), steep, 50)
    assert steep.trees == 50 and max(sizes[5:]) <= 8  # each extra token costs: fewer


def test_tree_budget_stops_drafting_when_the_draft_is_too_slow_but_probes():
    clock = FakeClock()
    slow = FakeHybrid(clock, 0.3, [0.9] * 7)  # a CPU draft: 0.3 s against 10 ms a token
    budget = TreeBudget(TWO_CORE_Q4, clock=clock)
    sizes = run_budget(budget, slow, 3000)
    assert sizes[1:].count(1) > 2900  # plain decoding
    plain_seconds = 3000 * TWO_CORE_Q4.of(1)
    assert 2 <= slow.trees <= 2 + plain_seconds * budget.probe_share / 0.3
    # with a lookup chain the target keeps accepting, the chain is used instead
    chained = FakeHybrid(clock, 0.3, [0.9] * 7, chain=[5, 6, 7, 8], match_length=3,
                         chain_rate=0.95)
    budget = TreeBudget(TWO_CORE_Q4, clock=clock)
    sizes = run_budget(budget, chained, 100)
    assert sizes[1:].count(5) > 90


def test_tree_budget_grows_one_level_below_its_deepest_recent_cut():
    clock = FakeClock()
    steep = FakeHybrid(clock, 0.0005, [0.9] * 15)
    steep_budget = TreeBudget(TWO_CORE_Q4, clock=clock)
    sizes = run_budget(steep_budget, steep, 60)
    # a chain cut to n nodes reaches depth n − 1: the draft grows one level more
    assert steep_budget.growth_levels == max(sizes[-DEPTH_WINDOW:]) <= 8
    assert steep.growth_depth == max(sizes[-DEPTH_WINDOW - 1:-1])  # asked of the proposer
    flat = FakeHybrid(clock, 0.0005, [0.9] * 15)
    flat_budget = TreeBudget(FLAT, clock=clock)
    sizes = run_budget(flat_budget, flat, 60)
    assert flat_budget.growth_levels == max(sizes[-DEPTH_WINDOW:]) >= 12  # most pays
    # the target takes one token a step: cuts get small, and so does the growth; then it
    # accepts whole chains again, and the depth comes back a level per drafted step
    back = FakeHybrid(clock, 0.0005, [0.9] * 15)
    budget = TreeBudget(TWO_CORE_Q4, clock=clock)
    run_budget(budget, back, 150, accepted=lambda tree: min(1, tree.num_drafted))
    assert budget.growth_levels < steep_budget.growth_levels
    sizes = run_budget(budget, back, 150)
    assert budget.growth_levels == steep_budget.growth_levels == max(sizes[-DEPTH_WINDOW:])


def test_tree_budget_recovers_after_the_target_rejected_every_draft():
    """Trees cut to the root alone would tell the budget nothing: a probe verifies one
    drafted token at least, so drafting resumes once the target accepts again."""
    clock = FakeClock()
    proposer = FakeHybrid(clock, 0.0005, [0.9] * 15)
    budget = TreeBudget(TWO_CORE_Q4, clock=clock)
    sizes = run_budget(budget, proposer, 300, accepted=lambda tree: 0)
    assert max(sizes[-100:]) == 2 and budget.calibration < 0.1  # probes only
    sizes = run_budget(budget, proposer, 300)
    assert budget.calibration > 0.9 and min(sizes[-50:]) > 4


def test_tree_budget_calibrates_the_draft_probabilities():
    clock = FakeClock()
    proposer = FakeHybrid(clock, 0.0005, [0.9] * 15)
    budget = TreeBudget(FLAT, clock=clock)
    run_budget(budget, proposer, 100, accepted=lambda tree: min(1, tree.num_drafted))
    assert budget.calibration < 0.3  # predicted ~5 accepted tokens, saw 1
    budget = TreeBudget(FLAT, clock=clock)
    run_budget(budget, proposer, 100)
    assert budget.calibration > 0.9


def test_each_request_goes_to_the_mode_that_served_faster_and_the_other_one_is_retried():
    draft = Mode("draft", proposer=None, budget=None)
    lookup = Mode("lookup", proposer=None, budget=None)
    choice = ProposerChoice([draft, lookup], explore=4)
    assert choice.pick() is draft and choice.pick() is draft  # untried until one finishes
    choice.observe(draft, seconds=1.4, tokens=100)  # 14 ms a token
    assert choice.pick() is lookup
    choice.observe(lookup, seconds=1.0, tokens=100)  # 10 ms a token: lookup alone wins
    picks = [choice.pick().name for _ in range(8)]
    assert picks.count("lookup") == 6 and picks.count("draft") == 2  # every 4th: the other
    for _ in range(6):  # the draft turns out far faster now (other texts): the choice
        choice.observe(draft, seconds=0.3, tokens=100)  # follows, and retries lookup alone
    picks = [choice.pick().name for _ in range(32)]  # only every 16th (over 1.5x slower)
    assert picks.count("draft") == 30 and picks.count("lookup") == 2
    choice.observe(lookup, seconds=1.0, tokens=0)  # nothing produced: no evidence
    assert lookup.requests == 1


def test_a_chains_only_budget_cuts_the_trees_likeliest_chain():
    """`--exact`: what is verified is a chain, so the budget sizes and predicts the chain."""
    clock = FakeClock()
    proposer = FakeHybrid(clock, 0.0005, [0.9])
    # root 0 → 1 (0.5) → 3 (0.9) → 5 (0.9); root → 2 (0.45) → 4 (0.95): 1-3-5 sums more
    proposer.tree = DraftTree(tokens=[0, 1, 2, 3, 4, 5], parents=[-1, 0, 0, 1, 2, 3],
                              depths=[0, 1, 1, 2, 2, 3],
                              draft_probs=[1.0, 0.5, 0.45, 0.9, 0.95, 0.9])
    budget = TreeBudget(FLAT, chains=True, clock=clock)
    sequence = Sequence([1], SamplingParams(temperature=0), 8, [], sink=lambda e: None)
    sequence.root_token = 0
    tree = budget.propose(proposer, sequence)
    assert tree.tokens == [0, 1, 3, 5] and tree.parents == [-1, 0, 1, 2]
    size, predicted, _ = sequence.budget_step
    assert size == 4 and predicted == pytest.approx(0.5 + 0.45 + 0.405)
    wide = TreeBudget(FLAT, clock=clock).propose(proposer, sequence)
    assert len(wide.tokens) == 6  # without chains: the whole tree


def test_tree_budget_drafts_ahead_only_while_steps_gain_from_it_and_retries_the_other_way():
    """Steps drafting ahead and steps that do not are timed as measured (verification,
    which a CPU draft slows, plus exposed drafting); tree steps go the faster way, and
    every AHEAD_PROBE-th the other."""
    clock = FakeClock()
    hybrid = FakeHybrid(clock, 0.0005, [0.9] * 7)
    sequence = Sequence([1], SamplingParams(temperature=0), 8, [], sink=lambda e: None)
    sequence.root_token = 0

    def steps(count, ahead_seconds, serial_seconds):
        budget = TreeBudget(FLAT, clock=clock)
        choices = []
        for _ in range(count):
            tree = budget.propose(hybrid, sequence)
            sequence.drafting_ahead = budget.draft_ahead_due(sequence)
            choices.append(sequence.drafting_ahead)
            sequence.verify_seconds = ahead_seconds if sequence.drafting_ahead \
                else serial_seconds
            budget.observe(sequence, tree, tree.num_drafted)
        return choices

    slowed = steps(80, ahead_seconds=0.030, serial_seconds=0.012)  # 2 cores: contention
    assert slowed[:2] == [True, False]  # each way measured first
    assert 8 <= slowed[2:].count(True) <= 11  # then only the probes
    hidden = steps(80, ahead_seconds=0.012, serial_seconds=0.020)  # a GPU draft, hidden
    assert 8 <= hidden[2:].count(False) <= 11
    sequence.budget_step = None  # a lookup or plain step is never drafted ahead of
    assert not TreeBudget(FLAT, clock=clock).draft_ahead_due(sequence)
