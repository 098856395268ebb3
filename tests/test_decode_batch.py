"""The tree checks every decode relies on, without a model: depths, leaves, accepted paths."""

from __future__ import annotations

import pytest

from verifier.decode_batch import tree_leaves, validate_path, validate_tree

#        0
#      /   \
#     1     2
#    / \     \
#   3   4     5
TREE = [-1, 0, 0, 1, 1, 2]


def test_depths_and_leaves_of_a_tree():
    assert validate_tree(TREE, len(TREE)) == [0, 1, 1, 2, 2, 2]
    assert tree_leaves(TREE) == [3, 4, 5]
    assert validate_tree([-1], 1) == [0] and tree_leaves([-1]) == [0]
    assert tree_leaves([-1, 0, 1, 2]) == [3]  # a chain has one leaf


@pytest.mark.parametrize("parents, num_nodes, message", [
    ([], 0, "at least a root"),
    ([-1, 0], 3, "one parent index per node"),
    ([0, -1], 2, "must be the root"),
    ([-1, 1], 2, "parents must precede"),
    ([-1, 0, 3, 0], 4, "parents must precede"),
    ([-1, -1], 2, "parents must precede"),
])
def test_bad_trees_are_refused(parents, num_nodes, message):
    with pytest.raises(ValueError, match=message):
        validate_tree(parents, num_nodes)


def test_accepted_paths_follow_the_tree_from_the_root():
    for path in ([], [0], [0, 1], [0, 1, 4], [0, 2, 5]):
        validate_path(path, TREE)
    with pytest.raises(ValueError, match="starts at the root"):
        validate_path([1, 3], TREE)
    with pytest.raises(ValueError, match="not a child"):
        validate_path([0, 1, 5], TREE)  # 5 hangs under 2
    with pytest.raises(ValueError, match="not a child"):
        validate_path([0, 9], TREE)
