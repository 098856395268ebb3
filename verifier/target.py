"""The CPU target on llama.cpp's low-level API: prefill, verify a token tree, commit.

One llama.cpp context serves every request. When trees have branches its KV cache is
*unified* (one pool of cells shared by all sequence ids), which is what lets a single
decode verify a tree; which ids and cells each request holds is verifier/kv_slots.py's.

With `features` on (for a draft), the context has embeddings on, so every decoded token
yields both its logits and its post-final-norm hidden state (the feature the draft reads).
While embeddings are on llama.cpp makes every token an output (the LM head runs for each);
a decode of only prompt chunks that need no features (`PromptChunk.features` off: a request
served without the draft) turns them off for that decode, computing the last token's logits
only, as a target without features does — unless a chunk asks for every token's logits
(`PromptChunk.logits`: the prompt's logprobs).

`evaluate` is the one decode: the trees of several slots and chunks of other slots' prompts
go into a single llama.cpp batch (distinct sequence ids keep them apart), so concurrent
requests share one pass over the weights. `prefill` and `verify_tree` are its one-slot forms.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from verifier.chat_template import ChatTemplate
from verifier.decode_batch import (
    ChunkOutput,
    DecodeBatch,
    PrefillOutput,
    PromptChunk,
    TreeOutput,
    TreeRequest,
    tree_leaves,
    validate_tree,
)
from verifier.kv_slots import KvSlots
from verifier.tokenizer import Tokenizer
from verifier.weight_buffers import use_extra_buffers

_backend_ready = False


@dataclass(frozen=True)
class TargetConfig:
    model_path: Path
    num_slots: int = 4  # requests that can hold KV at the same time
    ctx_size: int = 4096  # per slot: prompt + completion tokens
    max_tree_nodes: int = 64  # tokens verified in one decode, root included
    max_tree_branches: int = 16  # leaves of one verified tree
    batch_size: int = 512  # prompt tokens per llama.cpp decode
    num_threads: int = 1
    # llama.cpp's flash attention kernel rounds differently from the default one; off by
    # default so that greedy output equals llama-cpp-python's (which also leaves it off).
    flash_attn: bool = False
    # Post-norm features of every evaluated token, for a draft model. Off (plain decoding):
    # no features, and a prompt chunk computes logits for its last token only.
    features: bool = True
    # A released slot keeps its tokens' KV; a new prompt gets the free slot that shares the
    # longest prefix with it and skips evaluating that prefix (as llama-cpp-python does).
    reuse_prefixes: bool = False
    # llama.cpp's extra weight buffer types (AMX tiles, repacked layouts): "auto" (off where
    # the build uses AMX, whose kernel crashed here: verifier/weight_buffers.py), "on", "off".
    extra_buffers: str = "auto"


class Target:
    def __init__(self, config: TargetConfig) -> None:
        global _backend_ready
        if not _backend_ready:
            # llama-cpp-python routes llama.cpp's log through this logger: errors only.
            logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
            llama_cpp.llama_backend_init()
            _backend_ready = True
        if not Path(config.model_path).is_file():
            raise FileNotFoundError(f"model file not found: {config.model_path}")
        self.config = config

        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        model_params.use_extra_bufts = use_extra_buffers(config.extra_buffers)
        self._model = llama_cpp.llama_model_load_from_file(
            str(config.model_path).encode(), model_params
        )
        if not self._model:
            raise ValueError(f"llama.cpp could not load {config.model_path}")
        self.tokenizer = Tokenizer(self._model)
        self.chat_template = self._load_chat_template()
        self.vocab_size = self.tokenizer.vocab_size
        self.hidden_size: int = llama_cpp.llama_model_n_embd(self._model)
        self.ctx_train: int = llama_cpp.llama_model_n_ctx_train(self._model)

        num_seq_max = config.num_slots * config.max_tree_branches
        if num_seq_max > llama_cpp.llama_max_parallel_sequences():
            raise ValueError(
                f"num_slots × max_tree_branches = {num_seq_max} exceeds llama.cpp's limit of "
                f"{llama_cpp.llama_max_parallel_sequences()} sequences"
            )
        # one prompt chunk plus a full tree for every slot fit in one decode
        batch_capacity = config.batch_size + config.num_slots * config.max_tree_nodes
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = config.num_slots * (config.ctx_size + config.max_tree_nodes)
        ctx_params.n_batch = batch_capacity
        ctx_params.n_ubatch = batch_capacity
        ctx_params.n_seq_max = num_seq_max
        ctx_params.n_threads = config.num_threads
        ctx_params.n_threads_batch = config.num_threads
        ctx_params.embeddings = config.features
        ctx_params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED
        # Trees need one pool of cells shared by their branches' sequence ids. Without
        # branches (plain decoding, chains) each slot gets its own cells, and a token
        # attends over its own request's cells only, not over every request's.
        ctx_params.kv_unified = config.max_tree_branches > 1
        ctx_params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if config.flash_attn
                                      else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self._ctx = llama_cpp.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise RuntimeError("llama.cpp could not create a context (out of memory?)")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._embeddings = config.features  # the context's current setting
        self._batch = DecodeBatch(batch_capacity, num_seq_max)
        self._kv = KvSlots(self._memory, config.num_slots, config.max_tree_branches,
                           config.reuse_prefixes)

    @property
    def chains_only(self) -> bool:
        """Each slot's cells in a stream of their own: a token's attention then sums over
        its own request's cells, in position order, as in plain decoding (bit-identical
        logits with exact kernels: verifier/kernels.py). Trees need one pool of cells for
        their branches, where that order is lost."""
        return self.config.max_tree_branches == 1

    # -- chat template --------------------------------------------------------------------

    def _load_chat_template(self) -> ChatTemplate | None:
        source = llama_cpp.llama_model_chat_template(self._model, None)
        if not source:
            return None
        return ChatTemplate(
            source.decode("utf-8"),
            bos_token=self.tokenizer.token_text(self.tokenizer.bos_id),
            eos_token=self.tokenizer.token_text(self.tokenizer.eos_id),
        )

    # -- slots ------------------------------------------------------------------------------

    @property
    def num_free_slots(self) -> int:
        return self._kv.num_free

    def acquire_slot(self, prompt: Sequence[int] = ()) -> int:
        """A free slot, empty — or, with reuse_prefixes, the free slot whose kept tokens share
        the longest prefix with `prompt`, holding that prefix: see `num_cached`."""
        return self._kv.acquire(prompt)

    def release_slot(self, slot_index: int) -> None:
        """Free the slot (its committed cells stay for a later prompt with reuse_prefixes)."""
        self._kv.release(slot_index)

    def truncate(self, slot_index: int, keep: int) -> None:
        """Keep only the first `keep` committed tokens of a slot between trees."""
        self._kv.truncate(slot_index, keep)

    def num_cached(self, slot_index: int) -> int:
        return self._kv.num_cached(slot_index)

    # -- decoding ---------------------------------------------------------------------------

    def prefill(self, slot_index: int, tokens: Sequence[int]) -> PrefillOutput:
        """Evaluate a fresh slot's whole prompt in chunks of batch_size and commit it."""
        slot = self._kv.acquired(slot_index)
        if slot.num_cached or slot.node_leaf is not None:
            raise RuntimeError("prefill needs an empty slot")
        if not tokens:
            raise ValueError("empty prompt")
        if len(tokens) > self.config.ctx_size:
            raise ValueError(f"{len(tokens)} prompt tokens exceed the context of "
                             f"{self.config.ctx_size}")
        step = self.config.batch_size
        chunks = [self.evaluate([], [PromptChunk(slot_index, tokens[start : start + step])])[1][0]
                  for start in range(0, len(tokens), step)]
        return PrefillOutput(last_logits=chunks[-1].last_logits,
                             features=np.concatenate([chunk.features for chunk in chunks]))

    def verify_tree(self, slot_index: int, tokens: Sequence[int],
                    parents: Sequence[int]) -> TreeOutput:
        """Evaluate a token tree on top of the slot's committed tokens in one decode.

        tokens[0] is the root (the last token the target chose, not yet in the cache);
        parents[i] is the index of node i's parent, parents[0] = -1, parents[i] < i.
        Plain decoding is a tree of one node. `commit` must follow before the next call.
        """
        return self.evaluate([TreeRequest(slot_index, tokens, parents)], [])[0][0]

    def check_tree(self, request: TreeRequest) -> list[int]:
        """Raise ValueError/RuntimeError if the tree cannot be verified; return node depths."""
        slot = self._kv.acquired(request.slot)
        if slot.node_leaf is not None:
            raise RuntimeError("verify_tree called twice without commit")
        num_nodes = len(request.tokens)
        depths = validate_tree(request.parents, num_nodes)
        if num_nodes > self.config.max_tree_nodes:
            raise ValueError(f"tree of {num_nodes} nodes exceeds max_tree_nodes")
        if slot.num_cached + max(depths) + 1 > self.config.ctx_size + self.config.max_tree_nodes:
            raise ValueError("tree does not fit in the slot's context")
        if len(tree_leaves(request.parents)) > self.config.max_tree_branches:
            raise ValueError("tree has more leaves than max_tree_branches")
        return depths

    def check_chunk(self, chunk: PromptChunk) -> None:
        slot = self._kv.acquired(chunk.slot)
        if slot.node_leaf is not None:
            raise RuntimeError("a prompt chunk cannot follow an uncommitted tree")
        if not chunk.tokens:
            raise ValueError("empty prompt chunk")
        if slot.num_cached + len(chunk.tokens) > self.config.ctx_size:
            raise ValueError(f"{slot.num_cached + len(chunk.tokens)} prompt tokens exceed the "
                             f"context of {self.config.ctx_size}")

    def evaluate(self, trees: Sequence[TreeRequest],
                 chunks: Sequence[PromptChunk]) -> tuple[list[TreeOutput], list[ChunkOutput]]:
        """One llama.cpp decode for the trees of some slots and prompt chunks of others.

        Every request is checked before the KV cache is touched. Trees then await `commit`;
        chunks are committed at once. If the decode fails, the KV cache is as before.
        """
        slots = [request.slot for request in (*trees, *chunks)]
        if len(set(slots)) != len(slots):
            raise ValueError("one request per slot per decode")
        all_depths = [self.check_tree(tree) for tree in trees]
        for chunk in chunks:
            self.check_chunk(chunk)
        total = sum(len(tree.tokens) for tree in trees) + sum(len(c.tokens) for c in chunks)
        if total > self._batch.capacity:
            raise ValueError(f"{total} tokens exceed the decode capacity of {self._batch.capacity}")

        features = self.config.features and (bool(trees) or any(c.features for c in chunks))
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[Sequence[int]] = []
        outputs: list[bool] = []  # which tokens' logits (and features) llama.cpp returns
        for tree, depths in zip(trees, all_depths, strict=True):
            node_seqs = self._kv.branch_tree(tree)
            cached = self._kv.num_cached(tree.slot)
            tokens.extend(tree.tokens)
            positions.extend(cached + depth for depth in depths)
            seqs.extend(node_seqs)
            outputs.extend([True] * len(tree.tokens))
        for chunk in chunks:
            cached = self._kv.num_cached(chunk.slot)
            base = self._kv.seq_ids(chunk.slot)[0]
            count = len(chunk.tokens)
            tokens.extend(chunk.tokens)
            positions.extend(range(cached, cached + count))
            seqs.extend([(base,)] * count)
            outputs.extend([features or chunk.logits] * (count - 1) + [True])
        if self.config.features and features != self._embeddings:
            llama_cpp.llama_set_embeddings(self._ctx, features)
            self._embeddings = features
        try:
            self._decode(tokens, positions, seqs, outputs)
        except RuntimeError:
            for slot_index in slots:
                self._kv.drop_uncommitted(slot_index)
            raise

        num_outputs = sum(outputs)
        logits = self._outputs(llama_cpp.llama_get_logits, num_outputs, self.vocab_size)
        hidden = self._outputs(llama_cpp.llama_get_embeddings, num_outputs, self.hidden_size) \
            if features else np.empty((num_outputs, 0), dtype=np.float32)
        tree_outputs, chunk_outputs = [], []
        offset = 0
        for tree in trees:
            rows = slice(offset, offset + len(tree.tokens))
            tree_outputs.append(TreeOutput(logits=logits[rows].copy(),
                                           features=hidden[rows].copy()))
            offset = rows.stop
        for chunk in chunks:
            rows = slice(offset, offset + (len(chunk.tokens) if features or chunk.logits else 1))
            chunk_outputs.append(ChunkOutput(
                last_logits=logits[rows.stop - 1].copy(), features=hidden[rows].copy(),
                logits=logits[rows].copy() if chunk.logits else None))
            self._kv.add_chunk(chunk.slot, chunk.tokens)
            offset = rows.stop
        return tree_outputs, chunk_outputs

    def decode(self, slot_index: int, token: int) -> TreeOutput:
        """One token: a tree that is only a root. `commit(slot, [0])` keeps it."""
        return self.verify_tree(slot_index, [token], [-1])

    def commit(self, slot_index: int, path: Sequence[int]) -> None:
        """Keep the KV of the accepted root→node path of the last tree; drop the rest (the
        target's only KV rollback: KvSlots.commit)."""
        self._kv.commit(slot_index, path)

    def sequence_positions(self, slot_index: int) -> list[tuple[int, int]]:
        """(min, max) position held by each of the slot's sequences, base first."""
        return self._kv.sequence_positions(slot_index)

    def kv_cells(self) -> tuple[int, int]:
        """(KV cells held by acquired slots, cells free slots keep for prompt prefixes)."""
        return self._kv.kv_cells()

    def close(self) -> None:
        if self._ctx:
            self._batch.free()
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = None

    # -- internals --------------------------------------------------------------------------

    def _decode(self, tokens: Sequence[int], positions: Sequence[int],
                seq_ids: Sequence[Sequence[int]], outputs: Sequence[bool]) -> None:
        self._batch.fill(tokens, positions, seq_ids, outputs)
        status = llama_cpp.llama_decode(self._ctx, self._batch.raw)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")

    def _outputs(self, getter, count: int, width: int) -> np.ndarray:
        """A [count, width] view on llama.cpp's output buffer (valid until the next decode)."""
        pointer = getter(self._ctx)
        return np.ctypeslib.as_array(pointer, shape=(count, width))
