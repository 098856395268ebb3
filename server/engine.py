"""The generation loop, on its own thread: admit → draft → verify → accept → commit → emit.

Every active sequence advances by one verification step per engine step, round robin.
In plain decoding (`--draft none`) the tree verified each step is just the root, and the
target's own next token is the only one emitted; the speculative engine plugs its draft
and acceptance rule into the same step.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from server.sequence import Sequence, SequenceEvent
from verifier.sampling import choose_token
from verifier.target import Target

log = logging.getLogger("dovetail.engine")


class Engine:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.tokenizer = target.tokenizer
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._wakeup = threading.Condition()
        self._is_stopping = False
        self._thread: threading.Thread | None = None

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
                sequence.finish("cancelled")
            else:
                self._guarded(self._advance, sequence)
            self._emit(sequence)
        self._retire()

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
        self._add_target_token(sequence, output.last_logits)

    def _advance(self, sequence: Sequence) -> None:
        """One verification step. Plain decoding: the tree is the root alone."""
        output = self.target.verify_tree(sequence.slot, [sequence.root_token], [-1])
        self.target.commit(sequence.slot, [0])
        sequence.num_verify_steps += 1
        self._add_target_token(sequence, output.logits[0])

    def _add_target_token(self, sequence: Sequence, logits) -> None:
        token = choose_token(logits, sequence.params, sequence.token_counts, sequence.rng)
        sequence.root_token = token
        sequence.add_token(token, self.tokenizer)

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
            else:
                still_active.append(sequence)
        self._active = still_active
