"""The target's KV cache, by slot: which sequence ids and cells each request holds, the
token trees awaiting verification, and the commit of an accepted path.

Sequence ids: slot s owns ids [s·B, (s+1)·B) with B = max_tree_branches. Id s·B (the slot's
*base* sequence) holds the committed tokens; the others are scratch branches that exist only
between a tree's decode and `commit`. Each root→leaf branch of a tree is its own sequence
id and a node carries the ids of every branch through it, so in one unified cache each node
attends exactly to the committed prefix plus its own ancestors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import llama_cpp

from verifier.decode_batch import TreeRequest, tree_leaves, validate_path


@dataclass
class Slot:
    num_cached: int = 0  # committed tokens in the base sequence (positions 0..num_cached-1)
    # Between a tree's decode and commit: for each node, the index of one leaf whose branch
    # contains it, and the number of leaves.
    node_leaf: list[int] | None = None
    parents: list[int] | None = None
    num_leaves: int = 0
    is_free: bool = True
    tokens: list[int] = field(default_factory=list)  # the committed token ids
    tree_tokens: list[int] | None = None  # the tree awaiting commit


class KvSlots:
    def __init__(self, memory, num_slots: int, max_tree_branches: int,
                 reuse_prefixes: bool) -> None:
        """memory: the llama.cpp context's KV memory. reuse_prefixes: a released slot keeps
        its tokens' cells for a later prompt that starts with them."""
        self._memory = memory
        self.max_tree_branches = max_tree_branches
        self.reuse_prefixes = reuse_prefixes
        self._slots = [Slot() for _ in range(num_slots)]

    @property
    def num_free(self) -> int:
        return sum(slot.is_free for slot in self._slots)

    def acquire(self, prompt: Sequence[int] = ()) -> int:
        """A free slot, empty — or, with reuse_prefixes, the free slot whose kept tokens share
        the longest prefix with `prompt`, holding that prefix (all but the prompt's last two
        tokens at most): see `num_cached`."""
        free = [index for index, slot in enumerate(self._slots) if slot.is_free]
        if not free:
            raise RuntimeError("no free slot")
        best, keep = free[0], 0
        if self.reuse_prefixes and prompt:
            # longest shared prefix; among equals, the slot that keeps least (spare the rest)
            shared = {index: _common_prefix(self._slots[index].tokens, prompt) for index in free}
            best = max(free, key=lambda index: (shared[index], -len(self._slots[index].tokens)))
            # Leave at least two tokens to evaluate: a quantized model's one-token kernels
            # round differently from its batched ones, and the prompt's last logits must
            # not depend on whether a prefix was kept.
            keep = max(0, min(shared[best], len(prompt) - 2))
        else:
            best = min(free, key=lambda index: len(self._slots[index].tokens))
        base = self.seq_ids(best)[0]
        llama_cpp.llama_memory_seq_rm(self._memory, base, keep, -1)
        self._slots[best] = Slot(num_cached=keep, is_free=False,
                                 tokens=self._slots[best].tokens[:keep])
        return best

    def release(self, slot_index: int) -> None:
        """Free the slot: drop its scratch branches and an uncommitted tree; its committed
        cells too, unless reuse_prefixes keeps them for a later prompt."""
        slot = self._slots[slot_index]
        self.drop_uncommitted(slot_index)
        if not self.reuse_prefixes:
            llama_cpp.llama_memory_seq_rm(self._memory, self.seq_ids(slot_index)[0], -1, -1)
            slot.tokens = []
        self._slots[slot_index] = Slot(is_free=True, tokens=slot.tokens)

    def truncate(self, slot_index: int, keep: int) -> None:
        """Keep only the first `keep` committed tokens of a slot between trees (e.g. of a
        prefix `acquire` kept, when the caller can use less of it)."""
        slot = self.acquired(slot_index)
        if slot.node_leaf is not None or not 0 <= keep <= slot.num_cached:
            raise ValueError(f"cannot keep {keep} of the slot's {slot.num_cached} tokens here")
        llama_cpp.llama_memory_seq_rm(self._memory, self.seq_ids(slot_index)[0], keep, -1)
        slot.num_cached = keep
        del slot.tokens[keep:]

    def num_cached(self, slot_index: int) -> int:
        return self._slots[slot_index].num_cached

    def seq_ids(self, slot_index: int) -> range:
        base = slot_index * self.max_tree_branches
        return range(base, base + self.max_tree_branches)

    def acquired(self, slot_index: int) -> Slot:
        slot = self._slots[slot_index]
        if slot.is_free:
            raise RuntimeError(f"slot {slot_index} is not acquired")
        return slot

    def add_chunk(self, slot_index: int, tokens: Sequence[int]) -> None:
        """A prompt chunk was decoded into the base sequence: it is committed."""
        slot = self._slots[slot_index]
        slot.num_cached += len(tokens)
        slot.tokens.extend(tokens)

    def branch_tree(self, tree: TreeRequest) -> list[list[int]]:
        """Give each root→leaf branch its own sequence id; return every node's ids.

        Branch k is sequence seq_ids[k]; branch 0 is the base sequence itself, the others
        first share the committed prefix (cells gain a sequence id, nothing is copied).
        """
        slot = self._slots[tree.slot]
        parents = tree.parents
        num_nodes = len(tree.tokens)
        leaves = tree_leaves(parents)
        seq_ids = self.seq_ids(tree.slot)
        node_seqs: list[list[int]] = [[] for _ in range(num_nodes)]
        node_leaf = [-1] * num_nodes
        for k, leaf in enumerate(leaves):
            if k > 0:
                llama_cpp.llama_memory_seq_cp(self._memory, seq_ids[0], seq_ids[k], -1, -1)
            node = leaf
            while node >= 0:
                node_seqs[node].append(seq_ids[k])
                if node_leaf[node] < 0:
                    node_leaf[node] = k
                node = parents[node]
        slot.node_leaf, slot.parents, slot.num_leaves = node_leaf, list(parents), len(leaves)
        slot.tree_tokens = list(tree.tokens)
        return node_seqs

    def drop_uncommitted(self, slot_index: int) -> None:
        """Undo a failed decode's bookkeeping: keep only the committed tokens."""
        slot = self._slots[slot_index]
        seq_ids = self.seq_ids(slot_index)
        llama_cpp.llama_memory_seq_rm(self._memory, seq_ids[0], slot.num_cached, -1)
        for seq in seq_ids[1:]:
            llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
        slot.node_leaf, slot.parents, slot.num_leaves = None, None, 0
        slot.tree_tokens = None

    def commit(self, slot_index: int, path: Sequence[int]) -> None:
        """Keep the KV of the accepted root→node path of the last tree; drop the rest.

        This is the only place where the target's KV is rolled back. The accepted path lies
        inside one branch (the leaf recorded for its last node). If that branch is the base
        sequence, the base is trimmed after the path; otherwise the base drops all tree cells
        and re-acquires the path's cells from that branch. Then every scratch branch is
        removed, freeing cells no sequence holds. Positions stay contiguous:
        0..num_cached-1 plus the path at num_cached..num_cached+len(path)-1.
        """
        slot = self.acquired(slot_index)
        if slot.node_leaf is None or slot.parents is None:
            raise RuntimeError("commit without a verified tree")
        validate_path(path, slot.parents)
        seq_ids = self.seq_ids(slot_index)
        start = slot.num_cached
        end = start + len(path)
        branch = slot.node_leaf[path[-1]] if path else 0
        if branch == 0:
            llama_cpp.llama_memory_seq_rm(self._memory, seq_ids[0], end, -1)
        else:
            llama_cpp.llama_memory_seq_rm(self._memory, seq_ids[0], start, -1)
            llama_cpp.llama_memory_seq_cp(self._memory, seq_ids[branch], seq_ids[0], start, end)
        for k in range(1, slot.num_leaves):
            llama_cpp.llama_memory_seq_rm(self._memory, seq_ids[k], -1, -1)
        slot.num_cached = end
        slot.tokens.extend(slot.tree_tokens[node] for node in path)
        slot.node_leaf, slot.parents, slot.num_leaves = None, None, 0
        slot.tree_tokens = None

    def sequence_positions(self, slot_index: int) -> list[tuple[int, int]]:
        """(min, max) position held by each of the slot's sequences, base first; (-1, -1)
        for an empty one. Between commits only the base holds anything."""
        return [(llama_cpp.llama_memory_seq_pos_min(self._memory, seq),
                 llama_cpp.llama_memory_seq_pos_max(self._memory, seq))
                for seq in self.seq_ids(slot_index)]

    def kv_cells(self) -> tuple[int, int]:
        """(KV cells held by acquired slots, cells free slots keep for prompt prefixes), in
        one pass over the sequences (call from the decoding thread)."""
        used = cached = 0
        for index, slot in enumerate(self._slots):
            cells = sum(high - low + 1 for low, high in self.sequence_positions(index)
                        if high >= 0)
            if slot.is_free:
                cached += cells
            else:
                used += cells
        return used, cached


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length
