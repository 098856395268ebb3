"""Greedy acceptance and lossless tree rejection sampling on synthetic distributions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from verifier.acceptance import accept_greedy, accept_sampled

VOCAB = 6


def chi_square_ok(samples, probs, quantile_999):
    """Pearson chi-square of sample counts against probs, below the 0.999 quantile."""
    probs = np.asarray(probs)
    counts = np.bincount(samples, minlength=len(probs))
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a zero-probability token"
    expected = probs[support] * len(samples)
    statistic = ((counts[support] - expected) ** 2 / expected).sum()
    return statistic < quantile_999


# 0.999 quantiles of chi-square by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 7: 24.32, 11: 31.26, 15: 37.70,
            17: 40.79, 19: 43.82, 23: 49.73, 29: 58.30, 35: 66.62}


def test_greedy_follows_the_argmax_branch():
    tokens = [9, 1, 2, 3, 4, 5]
    parents = [-1, 0, 0, 2, 2, 3]
    choice = {0: 2, 2: 3, 3: 5, 5: 0}  # target argmax after each node
    result = accept_greedy(tokens, parents, lambda node: choice[node])
    assert result.path == [0, 2, 3, 5]
    assert result.bonus_token == 0 and result.num_accepted == 3


def test_greedy_early_mismatch_and_root_only():
    tokens, parents = [9, 1, 2], [-1, 0, 1]
    result = accept_greedy(tokens, parents, lambda node: 4)
    assert result.path == [0] and result.bonus_token == 4 and result.num_accepted == 0
    result = accept_greedy([9], [-1], lambda node: 3)
    assert result.path == [0] and result.bonus_token == 3


def random_probs(rng, zeros=1):
    probs = rng.dirichlet(np.ones(VOCAB))
    probs[rng.choice(VOCAB, size=zeros, replace=False)] = 0.0
    return probs / probs.sum()


@pytest.mark.parametrize("children", [[1, 2], [3], [1, 1, 2], [0, 4, 5, 2], [2, 2, 2]])
def test_first_token_is_distributed_as_the_target(children):
    """One level: children may repeat; all-rejected falls back to the residual."""
    rng = np.random.default_rng(len(children) * 31 + children[0])
    probs = random_probs(rng)
    tokens = [7, *children]
    parents = [-1] + [0] * len(children)
    first = []
    for _ in range(30000):
        result = accept_sampled(tokens, parents, lambda node: probs, rng)
        first.append(tokens[result.path[1]] if len(result.path) > 1 else result.bonus_token)
    dof = int((probs > 0).sum()) - 1
    assert chi_square_ok(first, probs, CHI2_999[dof])


def test_two_token_joint_distribution_through_a_tree():
    """Two levels, the second depending on the first: the pair (x1, x2) must follow
    p1(x1)·p2(x2 | x1), whatever the tree looks like, including all-children-rejected."""
    rng = np.random.default_rng(5)
    p1 = random_probs(rng, zeros=2)
    p2 = {x: random_probs(rng, zeros=1) for x in range(VOCAB)}
    # children of the root: tokens 0, 3, 3 (a duplicate); below 0: 1, 2; below first 3: 5
    tokens = [9, 0, 3, 3, 1, 2, 5]
    parents = [-1, 0, 0, 0, 1, 1, 2]

    def target(node):
        if node == 0:
            return p1
        return p2[tokens[node]]

    pairs = Counter()
    num = 40000
    for _ in range(num):
        result = accept_sampled(tokens, parents, target, rng)
        emitted = [tokens[n] for n in result.path[1:]] + [result.bonus_token]
        if len(emitted) == 1:  # the first token came as a bonus: draw the second as plain
            emitted.append(int(rng.choice(VOCAB, p=p2[emitted[0]])))
        pairs[(emitted[0], emitted[1])] += 1
    joint = np.array([[p1[a] * p2[a][b] for b in range(VOCAB)] for a in range(VOCAB)]).ravel()
    samples = np.repeat(np.arange(VOCAB * VOCAB),
                        [pairs[(a, b)] for a in range(VOCAB) for b in range(VOCAB)])
    dof = int((joint > 0).sum()) - 1
    assert chi_square_ok(samples, joint, CHI2_999[dof])


def test_a_certain_child_is_always_accepted_and_zero_probability_never():
    rng = np.random.default_rng(0)
    certain = np.zeros(VOCAB)
    certain[4] = 1.0
    for _ in range(200):
        result = accept_sampled([0, 3, 4], [-1, 0, 0], lambda node: certain, rng)
        assert result.path == [0, 2] and result.bonus_token == 4
    impossible = np.full(VOCAB, 1 / (VOCAB - 1))
    impossible[3] = 0.0
    for _ in range(200):
        result = accept_sampled([0, 3], [-1, 0], lambda node: impossible, rng)
        assert result.path == [0] and result.bonus_token != 3


def test_a_seeded_generation_is_the_same_whatever_was_drafted():
    """One draw per output token: with the same seed, trees of any shape — nothing drafted,
    chains, branching trees, right or wrong guesses — emit the very tokens plain sampling
    emits (rejection sampling with its extra draws per candidate did not)."""
    conditional = {prev: random_probs(np.random.default_rng(prev), zeros=1)
                   for prev in range(VOCAB)}

    def generate(seed, guesses):
        """60 tokens; guesses(rng, last): (tokens, parents) drafted after the last token."""
        rng, guess_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1000)
        text = [0]
        while len(text) < 60:
            drafted, parents = guesses(guess_rng, text[-1])
            tokens = [text[-1], *drafted]
            result = accept_sampled(tokens, parents,
                                    lambda node, tokens=tokens: conditional[tokens[node]], rng)
            text += [tokens[n] for n in result.path[1:]] + [result.bonus_token]
        return text[:60]

    def nothing(guess_rng, last):
        return [], [-1]

    def chain(guess_rng, last):  # guesses drawn from the target's own distribution
        drafted, prev = [], last
        for _ in range(guess_rng.integers(0, 6)):
            prev = int(guess_rng.choice(VOCAB, p=conditional[prev]))
            drafted.append(prev)
        return drafted, list(range(-1, len(drafted)))

    def tree(guess_rng, last):  # two or three children at each of two levels, any tokens
        drafted, parents = [], [-1]
        for _ in range(guess_rng.integers(2, 4)):
            drafted.append(int(guess_rng.integers(VOCAB)))
            parents.append(0)
            child = len(drafted)
            for _ in range(guess_rng.integers(0, 3)):
                drafted.append(int(guess_rng.integers(VOCAB)))
                parents.append(child)
        return drafted, parents

    for seed in range(5):
        plain = generate(seed, nothing)
        assert generate(seed, chain) == plain
        assert generate(seed, tree) == plain
    assert generate(0, nothing) != generate(1, nothing)
