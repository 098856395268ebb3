"""The generation loop, on its own thread: admit → draft → verify → accept → commit → emit.

Every active sequence advances by one verification step per engine step, round robin.
Plain decoding is the same loop without a proposer: the tree verified each step is just the
root, and the target's own next token (the bonus token) is the only one emitted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque

import numpy as np

from draft_model.proposer import Proposer
from draft_model.tree import DraftTree
from server.metrics import Metrics
from server.sequence import Sequence, SequenceEvent
from verifier.acceptance import Acceptance, accept_greedy, accept_sampled
from verifier.sampling import adjust_logits, choose_token, target_probs
from verifier.target import Target, TreeOutput

log = logging.getLogger("dovetail.engine")


class Engine:
    def __init__(self, target: Target, proposer: Proposer | None = None,
                 metrics: Metrics | None = None) -> None:
        self.target = target
        self.proposer = proposer
        self.metrics = metrics
        self.tokenizer = target.tokenizer
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._wakeup = threading.Condition()
        self._is_stopping = False
        self._thread: threading.Thread | None = None
        self.kv_cells_used = 0  # read by /metrics; written only by the engine thread

    # -- called from other threads ----------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dovetail-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish every sequence as cancelled and join the thread."""
        with self._wakeup:
            self._is_stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, sequence: Sequence) -> None:
        with self._wakeup:
            self._waiting.append(sequence)
            self._wakeup.notify()

    def cancel(self, sequence: Sequence) -> None:
        """Stop a sequence at the next step and free its slot (client went away)."""
        sequence.cancelled.set()
        with self._wakeup:
            self._wakeup.notify()

    @property
    def num_active(self) -> int:
        return len(self._active)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # -- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not (self._waiting or self._active or self._is_stopping):
                    self._wakeup.wait()
                if self._is_stopping:
                    break
            self.step()
        for sequence in [*self._active, *self._waiting]:
            if not sequence.is_finished:
                sequence.finish("cancelled")
            self._emit(sequence)
            if sequence.slot is not None:
                self.target.release_slot(sequence.slot)
        self._active.clear()
        self._waiting.clear()

    def step(self) -> None:
        self._admit()
        for sequence in self._active:
            if sequence.cancelled.is_set():
                sequence.finish("cancelled")  # no-op for a sequence already finished
            if not sequence.is_finished:  # it may have ended at its prefill (max_tokens=1)
                self._guarded(self._advance, sequence)
            self._emit(sequence)
        self._retire()
        self.kv_cells_used = self.target.num_kv_cells_used()

    def _admit(self) -> None:
        """Give waiting sequences a slot: prefill the prompt and choose the first token."""
        while self._waiting and self.target.num_free_slots:
            with self._wakeup:
                sequence = self._waiting.popleft()
            self._active.append(sequence)
            if sequence.cancelled.is_set():
                sequence.finish("cancelled")
                continue
            sequence.slot = self.target.acquire_slot()
            self._guarded(self._prefill, sequence)

    def _prefill(self, sequence: Sequence) -> None:
        output = self.target.prefill(sequence.slot, sequence.prompt_tokens)
        token = choose_token(output.last_logits, sequence.params, sequence.token_counts,
                             sequence.rng)
        if self.proposer is not None:
            capacity = len(sequence.prompt_tokens) + sequence.max_new_tokens + 1
            sequence.draft_state = self.proposer.new_state(capacity)
            self.proposer.begin(sequence.draft_state, sequence.prompt_tokens, output.features,
                                token)
        sequence.record_step(num_drafted=0, num_accepted=0)
        sequence.root_token = token
        sequence.add_token(token, self.tokenizer)

    def _advance(self, sequence: Sequence) -> None:
        """One verification step: draft a tree, verify it, accept, commit both sides, emit."""
        started = time.perf_counter()
        if self.proposer is None:
            tree = DraftTree.root_only(sequence.root_token)
        else:
            tree = self.proposer.propose(sequence.draft_state, sequence.root_token)
        drafted = time.perf_counter()
        output = self.target.verify_tree(sequence.slot, tree.tokens, tree.parents)
        acceptance = self._accept(sequence, tree, output)
        self.target.commit(sequence.slot, acceptance.path)
        new_tokens = [tree.tokens[node] for node in acceptance.path[1:]]
        new_tokens.append(acceptance.bonus_token)
        if self.proposer is not None:
            self.proposer.commit(sequence.draft_state, output.features[acceptance.path],
                                 new_tokens)
        sequence.record_step(num_drafted=tree.num_drafted, num_accepted=acceptance.num_accepted)
        if self.metrics is not None:
            self.metrics.observe_step(tree.num_drafted, acceptance.num_accepted,
                                      drafted - started, time.perf_counter() - drafted)
        sequence.root_token = acceptance.bonus_token
        for token in new_tokens:
            sequence.add_token(token, self.tokenizer)
            if sequence.is_finished:
                break

    @staticmethod
    def _accept(sequence: Sequence, tree: DraftTree, output: TreeOutput) -> Acceptance:
        params = sequence.params

        def processed_logits(node: int) -> np.ndarray:
            counts = sequence.token_counts
            if params.needs_adjustment:
                counts = Counter(counts)
                ancestor = node
                while ancestor > 0:  # penalties see the tokens this node's path adds
                    counts[tree.tokens[ancestor]] += 1
                    ancestor = tree.parents[ancestor]
            return adjust_logits(output.logits[node], params, counts)

        if params.is_greedy:
            return accept_greedy(tree.tokens, tree.parents,
                                 lambda node: int(np.argmax(processed_logits(node))))
        return accept_sampled(tree.tokens, tree.parents,
                              lambda node: target_probs(processed_logits(node), params),
                              sequence.rng)

    def _guarded(self, work, sequence: Sequence) -> None:
        """A failure in one sequence ends that sequence with an error, not the engine."""
        try:
            work(sequence)
        except Exception as error:
            log.exception("request %s failed", sequence.request_id)
            sequence.fail(f"generation failed: {error}")

    def _emit(self, sequence: Sequence) -> None:
        event: SequenceEvent | None = sequence.take_event()
        if event is None:
            return
        try:
            sequence.sink(event)
        except RuntimeError:  # the receiving event loop is gone (server shutting down)
            sequence.cancelled.set()

    def _retire(self) -> None:
        still_active = []
        for sequence in self._active:
            if sequence.is_finished:
                if sequence.slot is not None:
                    self.target.release_slot(sequence.slot)
                    sequence.slot = None
                sequence.draft_state = None
            else:
                still_active.append(sequence)
        self._active = still_active
