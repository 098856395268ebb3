"""Prompt lookup and the adaptive draft budget: pure logic on synthetic costs and
acceptance, then exactness on the real (F16) target."""

from __future__ import annotations

import pytest

from draft_model.ngram import NgramProposer
from server.budget import AcceptanceEstimate, LookupBudget, best_length
from server.engine import Engine
from server.sequence import Sequence
from tests.conftest import make_target
from verifier.costs import VerifyCosts, measure_verify_costs
from verifier.sampling import SamplingParams


def state_with(proposer, tokens):
    state = proposer.new_state(100)
    proposer.begin(state, tokens[:-1], None, tokens[-1])
    return state


def test_lookup_takes_the_longest_suffix_and_its_latest_occurrence():
    proposer = NgramProposer(max_ngram=3, max_tokens=4)
    # (7, 1, 2) occurs once before; (1, 2) occurs twice, latest followed by 8
    state = state_with(proposer, [7, 1, 2, 3, 4, 1, 2, 8, 9, 7, 1, 2])
    assert proposer.lookup(state, 4) == ([3, 4, 1, 2], 3)
    state = state_with(proposer, [5, 1, 2, 3, 4, 1, 2, 8, 9, 6, 1, 2])
    assert proposer.lookup(state, 3) == ([8, 9, 6], 2)
    assert proposer.lookup(state_with(proposer, [1, 2, 3, 4]), 4) == ([], 0)
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
    assert proposer.lookup(grown, 3) == proposer.lookup(at_once, 3) == ([4, 6, 2], 2)


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


def test_lookup_budget_scores_proposals_against_what_the_target_produced():
    budget = LookupBudget(FLAT, max_ngram=3, max_drafted=4)
    pending = []
    budget.remember(pending, output_length=2, proposal=[7, 8, 9], match_length=3)
    budget.remember(pending, output_length=2, proposal=[5], match_length=0)  # no match: skip
    budget.score(pending, [1, 2, 7])
    assert len(pending) == 1  # 7 matched, 8 and 9 not yet known
    budget.score(pending, [1, 2, 7, 8, 4])
    assert pending == []
    rates = budget.estimates[3].rates
    assert rates[0] > 0.5 and rates[1] > 0.5 and rates[2] < 0.5 and rates[3] == 0.5
    assert budget.choose(match_length=0, available=3) == 0


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
    budget = LookupBudget(costs, max_ngram=3, max_drafted=7)
    adaptive = generate(Engine(chain_target, NgramProposer(max_tokens=7), budget=budget), REPEAT)
    assert adaptive.output_tokens == plain.output_tokens
    assert any(rate != 0.5 for e in budget.estimates.values() for rate in e.rates)  # learnt
