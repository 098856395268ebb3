"""EAGLE-2 tree building on synthetic draft outputs (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from server.speculation.tree import DraftTree, TreeBuilder


def grow(builder: TreeBuilder, depth: int, rng: np.random.Generator) -> None:
    frontier = builder.add_children([0], *random_children(1, builder.top_k, rng))
    for _ in range(depth - 1):
        frontier = builder.add_children(frontier, *random_children(len(frontier),
                                                                    builder.top_k, rng))


def random_children(count: int, top_k: int, rng: np.random.Generator):
    tokens = rng.integers(0, 50, size=(count, top_k))
    probs = np.sort(rng.dirichlet(np.ones(top_k + 2), size=count)[:, :top_k], axis=1)[:, ::-1]
    return tokens, np.log(probs)


def ancestors(tree: DraftTree, node: int) -> list[int]:
    chain = []
    while node >= 0:
        chain.append(node)
        node = tree.parents[node]
    return chain


@pytest.mark.parametrize("seed", range(25))
def test_random_trees_are_well_formed(seed):
    rng = np.random.default_rng(seed)
    top_k, depth, total = int(rng.integers(1, 6)), int(rng.integers(1, 7)), int(rng.integers(1, 20))
    builder = TreeBuilder(root_token=7, top_k=top_k, total_tokens=total)
    grow(builder, depth, rng)
    tree = builder.finish()

    assert tree.tokens[0] == 7 and tree.parents[0] == -1 and tree.depths[0] == 0
    assert len(tree.tokens) == min(total, len(builder.tokens))
    for node in range(1, len(tree.tokens)):
        parent = tree.parents[node]
        assert 0 <= parent < node  # parents precede children
        assert tree.depths[node] == tree.depths[parent] + 1
        assert 0 < tree.draft_probs[node] <= 1
    # every selected node's path is selected, and the selection is the best-scoring set
    def score(node):
        return sum(np.log(tree.draft_probs[a]) for a in ancestors(tree, node))

    selected_scores = sorted((score(n) for n in range(1, len(tree.tokens))), reverse=True)
    all_scores = sorted(builder.scores[1:], reverse=True)
    np.testing.assert_allclose(selected_scores, all_scores[: len(selected_scores)], rtol=1e-9)


def test_ancestors_are_kept_even_on_ties():
    builder = TreeBuilder(root_token=1, top_k=2, total_tokens=3)
    frontier = builder.add_children([0], np.array([[10, 11]]), np.log(np.array([[1.0, 1e-9]])))
    builder.add_children(frontier, np.array([[20, 21], [30, 31]]),
                         np.log(np.array([[1.0, 1e-9], [0.5, 0.5]])))
    tree = builder.finish()
    # 10 (score 0) and its child 20 (score 0) tie; the parent must come with the child
    assert tree.tokens == [1, 10, 20]
    assert tree.parents == [-1, 0, 1]


def test_chain_mode_is_a_chain_of_top_tokens():
    builder = TreeBuilder(root_token=5, top_k=1, total_tokens=4)
    frontier = [0]
    for token in (6, 7, 8, 9):
        frontier = builder.add_children(frontier, np.array([[token]]), np.array([[-0.1]]))
    tree = builder.finish()
    assert tree.tokens == [5, 6, 7, 8]
    assert tree.parents == [-1, 0, 1, 2]
    assert tree.depths == [0, 1, 2, 3]


def test_frontier_is_the_best_top_k_new_candidates():
    builder = TreeBuilder(root_token=0, top_k=2, total_tokens=10)
    frontier = builder.add_children([0], np.array([[1, 2]]), np.log(np.array([[0.6, 0.3]])))
    assert [builder.tokens[n] for n in frontier] == [1, 2]
    frontier = builder.add_children(frontier, np.array([[3, 4], [5, 6]]),
                                    np.log(np.array([[0.5, 0.1], [0.9, 0.05]])))
    # scores: 3: .30, 4: .06, 5: .27, 6: .015
    assert [builder.tokens[n] for n in frontier] == [3, 5]


def test_attention_mask_sees_exactly_the_ancestors():
    tree = DraftTree(tokens=[1, 2, 3, 4, 5], parents=[-1, 0, 0, 1, 3], depths=[0, 1, 1, 2, 3],
                     draft_probs=[1.0] * 5)
    mask = tree.attention_mask()
    expected = np.zeros((5, 5), dtype=bool)
    for node in range(5):
        expected[node, ancestors(tree, node)] = True
    np.testing.assert_array_equal(mask, expected)


def test_a_grafted_chain_shares_tokens_and_competes_by_score():
    builder = TreeBuilder(root_token=0, top_k=2, total_tokens=4)
    frontier = builder.add_children([0], np.array([[1, 2]]), np.log(np.array([[0.5, 0.3]])))
    builder.add_children(frontier, np.array([[3, 4], [5, 6]]),
                         np.log(np.array([[0.4, 0.2], [0.5, 0.1]])))
    # lookup says 2 → 5 → 7 with chances 0.9, 0.8, 0.7 of surviving to each depth
    builder.add_chain([2, 5, 7], np.log([0.9, 0.8, 0.7]).tolist())
    tree = builder.finish()
    assert tree.tokens == [0, 2, 5, 7]  # the chain beats the draft's 1 (0.5) and 1→3 (0.2)
    assert tree.parents == [-1, 0, 1, 2]
    np.testing.assert_allclose(tree.path_probs(), [1.0, 0.9, 0.8, 0.7])
    assert sum(1 for p, t in zip(builder.parents, builder.tokens, strict=True)
               if p == 0 and t == 2) == 1  # shared, not duplicated
    # which proposer made each node: shared ones are the draft's, the chain's new one lookup's
    assert tree.origins == ["root", "draft", "draft", "lookup"]
    assert tree.best_chain().origins == tree.origins and tree.best(2).origins == ["root", "draft"]

    # an unlikely chain takes no room from the draft's better candidates
    builder = TreeBuilder(root_token=0, top_k=2, total_tokens=3)
    builder.add_children([0], np.array([[1, 2]]), np.log(np.array([[0.5, 0.3]])))
    builder.add_chain([8, 9], np.log([0.1, 0.05]).tolist())
    assert builder.finish().tokens == [0, 1, 2]


def test_a_raised_node_lifts_its_draft_children():
    builder = TreeBuilder(root_token=0, top_k=1, total_tokens=3)
    frontier = builder.add_children([0], np.array([[1]]), np.log(np.array([[0.2]])))
    builder.add_children(frontier, np.array([[3]]), np.log(np.array([[0.9]])))
    builder.add_chain([1], [np.log(0.8)])
    np.testing.assert_allclose(np.exp(builder.scores[1:]), [0.8, 0.72])


@pytest.mark.parametrize("seed", range(10))
def test_best_keeps_the_likeliest_nodes_with_their_ancestors(seed):
    rng = np.random.default_rng(seed)
    builder = TreeBuilder(root_token=7, top_k=3, total_tokens=12)
    grow(builder, 4, rng)
    tree = builder.finish()
    probs = tree.path_probs()
    for size in range(1, len(tree.tokens) + 1):
        cut = tree.best(size)
        assert len(cut.tokens) == size and cut.tokens[0] == 7
        for node in range(1, size):
            assert 0 <= cut.parents[node] < node
            assert cut.depths[node] == cut.depths[cut.parents[node]] + 1
        kept = sorted(cut.path_probs(), reverse=True)
        np.testing.assert_allclose(kept, sorted(probs, reverse=True)[:size])


@pytest.mark.parametrize("seed", range(25))
def test_best_chain_is_the_path_with_the_most_expected_accepted_tokens(seed):
    """Against every root→leaf path of a random tree, enumerated by brute force."""
    rng = np.random.default_rng(seed)
    builder = TreeBuilder(root_token=7, top_k=3, total_tokens=12)
    grow(builder, 4, rng)
    tree = builder.finish()
    probs = tree.path_probs()
    leaves = [node for node in range(len(tree.tokens)) if node not in tree.parents]
    paths = [ancestors(tree, leaf)[::-1] for leaf in leaves]
    best = max(sum(probs[node] for node in path) for path in paths)

    chain = tree.best_chain()
    assert chain.parents == list(range(-1, len(chain.tokens) - 1))
    assert chain.depths == list(range(len(chain.tokens)))
    assert any(chain.tokens == [tree.tokens[node] for node in path] for path in paths)
    assert sum(chain.path_probs()) == pytest.approx(best)
    assert chain.best_chain() == chain  # a chain is its own best chain


def test_best_chain_of_a_bare_root_is_the_root():
    assert DraftTree.root_only(5).best_chain() == DraftTree.root_only(5)


def test_a_subtree_is_rerooted_with_its_scores_counted_from_its_root():
    builder = TreeBuilder(root_token=100, top_k=2, total_tokens=8)
    first = builder.add_children([0], np.array([[1, 2]]), np.log(np.array([[0.6, 0.3]])))
    builder.add_children(first, np.array([[3, 4], [5, 6]]),
                         np.log(np.array([[0.5, 0.4], [0.9, 0.1]])))
    below, ids = builder.subtree(first[1], total_tokens=3)  # token 2: children 5, 6
    assert below.tokens == [2, 5, 6] and below.parents == [-1, 0, 0]
    assert below.depths == [0, 1, 1]
    np.testing.assert_allclose(np.exp(below.scores), [1.0, 0.9, 0.1])
    assert ids == {first[1]: 0, 5: 1, 6: 2}  # old candidate ids → new
    tree = below.finish()
    assert tree.tokens == [2, 5, 6] and tree.parents == [-1, 0, 0]


def test_drafting_ahead_guesses_where_acceptance_ends_with_a_drafted_bonus():
    """The guess is the verified node whose path the draft most likely sees accepted with
    a bonus token among its drafted children; the stand-ins are the draft's outputs at the
    root and the path's nodes above it."""
    from server.speculation.draft_ahead import Grown, likely_outcomes

    builder = TreeBuilder(root_token=100, top_k=2, total_tokens=4)
    first = builder.add_children([0], np.array([[1, 2]]), np.log(np.array([[0.9, 0.05]])))
    second = builder.add_children(first, np.array([[3, 4], [5, 6]]),
                                  np.log(np.array([[0.5, 0.45], [0.5, 0.5]])))
    builder.add_children(second, np.array([[7, 8], [9, 10]]),
                         np.log(np.array([[0.5, 0.5], [0.5, 0.5]])))
    outputs = {0: np.zeros(4), first[0]: np.ones(4), first[1]: np.full(4, 2.0),
               second[0]: np.full(4, 3.0), second[1]: np.full(4, 4.0)}
    grown = Grown.of(builder, outputs)
    assert grown.children[(1,)] == [(3, np.log(0.5)), (4, np.log(0.45))]
    # verified: 100 → 1 → 3, and 2 (the root's other child)
    tree = DraftTree([100, 1, 2, 3], [-1, 0, 0, 1], [0, 1, 1, 2], [1.0, 0.9, 0.05, 0.5])
    guesses = likely_outcomes(grown, tree, top_k=2, count=3)
    # stop at 1 with bonus 4: 0.9 × 0.45; at 3 with 7 or 8: 0.45 × 1.0; at the root: 0
    # (its children 1 and 2 are verified); at 2 with 5 or 6: 0.05 × 1.0
    assert [guess.tokens for guess in guesses] == [[1, 3], [1], [2]]
    guess = guesses[0]
    np.testing.assert_array_equal(guess.stand_ins, [np.zeros(4), np.ones(4)])
    assert guess.chance == pytest.approx(0.45)
    tree = DraftTree([100, 1, 2], [-1, 0, 0], [0, 1, 1], [1.0, 0.9, 0.05])
    assert likely_outcomes(grown, tree, top_k=2)[0].tokens == [1]  # 0.9 × 0.95
    # a verified leaf: its children are not drafted yet, so the average top mass counts
    tree = DraftTree([100, 1, 3, 7], [-1, 0, 1, 2], [0, 1, 2, 3], [1.0, 0.95, 0.95, 0.95])
    [guess] = likely_outcomes(grown, tree, top_k=2)
    assert guess.tokens == [1, 3, 7]
    np.testing.assert_array_equal(guess.stand_ins, [np.zeros(4), np.ones(4), np.full(4, 3.0)])
    assert guess.chance == pytest.approx(0.95**3 * np.mean([0.95, 0.95, 1.0, 1.0, 1.0]))
