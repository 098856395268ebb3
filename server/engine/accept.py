"""One sequence's acceptance of a verified tree: the target's processed choice at each node
(bias, penalties over the node's path, a grammar's mask), walked by verifier/acceptance.py."""

from __future__ import annotations

from collections import Counter

import numpy as np

from server.engine.sequence import Sequence
from server.speculation.tree import DraftTree
from verifier.acceptance import Acceptance, accept_greedy, accept_sampled
from verifier.decode_batch import TreeOutput
from verifier.sampling import adjust_logits, mask_logits, target_probs
from verifier.tokenizer import Tokenizer


def accept(sequence: Sequence, tree: DraftTree, output: TreeOutput,
           tokenizer: Tokenizer) -> Acceptance:
    """The path the target takes through the tree, and its bonus token.

    With a grammar the target chooses among the tokens it allows at each node. The walk
    visits the path's nodes root first, so the grammar's state follows it, consuming each
    node it steps onto, and ends after the bonus token: the state of the emitted text.
    """
    params, grammar = sequence.params, sequence.grammar

    def processed_logits(node: int) -> np.ndarray:
        counts = sequence.token_counts
        if params.needs_adjustment:
            counts = Counter(counts)
            ancestor = node
            while ancestor > 0:  # penalties see the tokens this node's path adds
                counts[tree.tokens[ancestor]] += 1
                ancestor = tree.parents[ancestor]
        logits = adjust_logits(output.logits[node], params, counts)
        if grammar is None:
            return logits
        if node:  # the walk stepped onto this node
            grammar.consume(tree.tokens[node])
        return mask_logits(logits, grammar.allowed())

    if params.is_greedy:
        acceptance = accept_greedy(tree.tokens, tree.parents,
                                   lambda node: int(np.argmax(processed_logits(node))))
    else:
        acceptance = accept_sampled(
            tree.tokens, tree.parents,
            lambda node: target_probs(processed_logits(node), params), sequence.rng)
    if grammar is not None and not tokenizer.is_end_of_generation(acceptance.bonus_token):
        grammar.consume(acceptance.bonus_token)
    return acceptance


def token_sources(tree: DraftTree, path: list[int], num_forced: int,
                  source: str | None) -> list[str]:
    """Where each new token of an accepted path came from ("forced", "draft", "lookup"),
    then the bonus token ("target"). The forced chain is nodes 1..num_forced: the accepted
    path runs along it first; other nodes are their proposer's (`source` where the tree
    does not say)."""
    return ["forced" if node <= num_forced else tree.origin(node) or source
            for node in path[1:]] + ["target"]
