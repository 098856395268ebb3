"""A draft tree under a grammar: forced tokens in front, forbidden branches cut.

The tokens a grammar forces next (a schema's keys, `": "`, closing braces) are known without
any drafting: they go first, as a chain below the root that the target verifies like any
drafted tokens (llguidance tokenizes the forced text one way; the target may still choose
another split of the same text, so they are proposed, not emitted). The proposers' nodes
that agree with that chain hang below it; every drafted node whose path the grammar forbids
is dropped with its subtree, since the target, masked by the same grammar, could never
choose it.
"""

from __future__ import annotations

from server.speculation.tree import DraftTree
from verifier.grammar import Grammar


def constrain_tree(tree: DraftTree, grammar: Grammar, max_nodes: int) -> tuple[DraftTree, int]:
    """The tree to verify and how many forced tokens it starts with (nodes 1..k, a chain).

    grammar: at the state after the root token. max_nodes: the root included.
    """
    forced = grammar.forced_tokens()[: max(max_nodes - 1, 0)]
    paths: list[list[int] | None] = [[]] + [None] * (len(tree.tokens) - 1)
    for node in range(1, len(tree.tokens)):
        parent_path = paths[tree.parents[node]]
        if parent_path is None:
            continue  # below a dropped node
        path = [*parent_path, tree.tokens[node]]
        depth = len(path)
        if depth <= len(forced) and path[-1] != forced[depth - 1]:
            continue  # off the forced text
        if depth > len(forced) and grammar.valid_prefix(path) < depth:
            continue
        paths[node] = path
    if not forced and all(path is not None for path in paths):
        return tree, 0
    tokens, parents, depths, probs = [tree.tokens[0]], [-1], [0], [1.0]
    origins = ["root"] + ["forced"] * len(forced)
    for depth, token in enumerate(forced, start=1):
        tokens.append(token)
        parents.append(depth - 1)
        depths.append(depth)
        probs.append(1.0)
    index = {0: 0}  # old node → new; the forced chain's nodes map to it below
    for node in range(1, len(tree.tokens)):
        path = paths[node]
        if path is None:
            continue
        if len(path) <= len(forced):
            if len(path) == len(forced):
                index[node] = len(forced)  # the forced chain's end: drafted nodes go below
            continue
        if len(tokens) >= max_nodes:
            break
        index[node] = len(tokens)
        tokens.append(tree.tokens[node])
        parents.append(index[tree.parents[node]])
        depths.append(len(path))
        probs.append(tree.draft_probs[node])
        origins.append(tree.origin(node) or "")
    return DraftTree(tokens, parents, depths, probs,
                     origins if tree.origins is not None else None), len(forced)
