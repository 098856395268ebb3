"""What one llama.cpp decode of the target takes and gives: token trees and prompt chunks,
their outputs, the llama_batch they are written into, and the checks on a tree's shape.

A tree is a parent array: parents[0] = -1 for the root, parents[i] < i for every other node.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import llama_cpp
import numpy as np


@dataclass(frozen=True)
class PrefillOutput:
    last_logits: np.ndarray  # [vocab] float32: predicts the first new token
    features: np.ndarray  # [num_prompt_tokens, hidden] float32, post-final-norm


@dataclass(frozen=True)
class TreeOutput:
    logits: np.ndarray  # [num_nodes, vocab] float32: row i predicts the token after node i
    features: np.ndarray  # [num_nodes, hidden] float32


@dataclass(frozen=True)
class TreeRequest:
    """A token tree to verify on top of a slot's committed tokens (see `verify_tree`)."""

    slot: int
    tokens: Sequence[int]
    parents: Sequence[int]


@dataclass(frozen=True)
class PromptChunk:
    """The next prompt tokens of a slot, evaluated and committed after its cached ones."""

    slot: int
    tokens: Sequence[int]
    features: bool = True  # (with a features target) every token's feature, for a draft
    logits: bool = False  # every token's logits (for the prompt's logprobs), not the last's only


@dataclass(frozen=True)
class ChunkOutput:
    last_logits: np.ndarray  # [vocab] float32: predicts the token after the chunk
    features: np.ndarray  # [len(tokens), hidden] float32, post-final-norm ([1, 0]: none)
    logits: np.ndarray | None = None  # [len(tokens), vocab] float32, when the chunk asked


@dataclass
class DecodeBatch:
    """A llama_batch sized for the largest decode, with numpy views on its arrays."""

    capacity: int
    num_seq_max: int
    raw: llama_cpp.llama_batch = field(init=False)

    def __post_init__(self) -> None:
        self.raw = llama_cpp.llama_batch_init(self.capacity, 0, self.num_seq_max)
        self.token = np.ctypeslib.as_array(self.raw.token, shape=(self.capacity,))
        self.pos = np.ctypeslib.as_array(self.raw.pos, shape=(self.capacity,))
        self.num_seq = np.ctypeslib.as_array(self.raw.n_seq_id, shape=(self.capacity,))
        self.is_output = np.ctypeslib.as_array(self.raw.logits, shape=(self.capacity,))

    def fill(self, tokens: Sequence[int], positions: Sequence[int],
             seq_ids: Sequence[Sequence[int]], outputs: Sequence[bool]) -> None:
        count = len(tokens)
        self.token[:count] = tokens
        self.pos[:count] = positions
        self.is_output[:count] = outputs
        for i, ids in enumerate(seq_ids):
            self.num_seq[i] = len(ids)
            row = self.raw.seq_id[i]
            for j, seq in enumerate(ids):
                row[j] = seq
        self.raw.n_tokens = count

    def free(self) -> None:
        llama_cpp.llama_batch_free(self.raw)


def validate_tree(parents: Sequence[int], num_nodes: int) -> list[int]:
    """Check the parent array; return each node's depth (root: 0)."""
    if num_nodes == 0 or len(parents) != num_nodes:
        raise ValueError("tree needs one parent index per node and at least a root")
    if parents[0] != -1:
        raise ValueError("node 0 must be the root (parent -1)")
    depths = [0] * num_nodes
    for i in range(1, num_nodes):
        if not 0 <= parents[i] < i:
            raise ValueError(f"node {i} has parent {parents[i]}; parents must precede children")
        depths[i] = depths[parents[i]] + 1
    return depths


def tree_leaves(parents: Sequence[int]) -> list[int]:
    has_child = [False] * len(parents)
    for parent in parents[1:]:
        has_child[parent] = True
    return [node for node in range(len(parents)) if not has_child[node]]


def validate_path(path: Sequence[int], parents: Sequence[int]) -> None:
    if not path:
        return
    if path[0] != 0:
        raise ValueError("an accepted path starts at the root (node 0)")
    for previous, node in itertools.pairwise(path):
        if not 0 <= node < len(parents) or parents[node] != previous:
            raise ValueError(f"node {node} is not a child of node {previous}")
