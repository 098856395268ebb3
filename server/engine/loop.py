"""The generation loop, on its own thread: admit → draft → verify → accept → commit → emit.

One engine step advances every active sequence together: each decoding sequence gets a
tree from its proposer (as much of it as its budget says pays), and all trees — plus the
next chunk of the prompts still being read — are verified in one llama.cpp decode
(`Target.evaluate`). Prompts are read `batch_size` tokens per step, oldest request first,
so a long prompt holds running streams up for at most one chunk per step. Plain decoding is
the same loop without a proposer: each tree is just the root, and the target's own next
token (the bonus token) is emitted.

With a per-request choice (server/speculation/choice.py) each request gets, when admitted,
one mode's proposer and budget — the draft, or prompt lookup alone, whose prompt is then
read without features. A draft that drafts ahead (server/speculation/draft_ahead.py) starts
the next trees on its own thread just before the decode; the commit settles them.

Limits: a sequence past its deadline (or past the shutdown grace) ends with what it has
("timeout"); one still waiting for a slot at its deadline, or when the server drains for
shutdown, is refused ("rejected").
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import numpy as np

from server.engine.accept import accept, token_sources
from server.engine.counters import EngineCounters
from server.engine.sequence import Sequence
from server.speculation.choice import ProposerChoice
from server.speculation.grammar_tree import constrain_tree
from server.speculation.proposer import Budget, FullBudget, Proposer
from server.speculation.tree import DraftTree
from verifier.acceptance import Acceptance
from verifier.decode_batch import ChunkOutput, PromptChunk, TreeOutput, TreeRequest
from verifier.sampling import choose_token
from verifier.target import Target

log = logging.getLogger("dovetail.engine")


class Engine:
    def __init__(self, target: Target, proposer: Proposer | None = None,
                 budget: Budget | None = None, choice: ProposerChoice | None = None) -> None:
        """budget: per step, how much of the proposal the target verifies (default: all of
        it); choice: per request, one of its modes' proposer and budget instead of these."""
        self.target = target
        self.proposer = proposer
        self.budget = budget if budget is not None or proposer is None else FullBudget()
        self.choice = choice
        self.counters = EngineCounters()  # read by /metrics; written only by this thread
        self.tokenizer = target.tokenizer
        self.chunk_size = target.config.batch_size  # prompt tokens read per step, at most
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._wakeup = threading.Condition()
        self._is_stopping = False
        self._drain_deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._verified = (0.0, 0.0)  # when the last verification ran (perf_counter seconds)

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

    def drain(self, grace_seconds: float) -> None:
        """Shutting down: refuse the waiting requests now, give the running ones
        grace_seconds to finish, then end them as timed out."""
        with self._wakeup:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + grace_seconds
            self._wakeup.notify()

    @property
    def is_draining(self) -> bool:
        return self._drain_deadline is not None

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
            sequence.send_event()
            if sequence.slot is not None:
                self.target.release_slot(sequence.slot)
        self._active.clear()
        self._waiting.clear()

    def step(self) -> None:
        """One step of every running sequence, in the method's order."""
        self._admit()
        running = self._running()
        trees = self._draft([s for s in running if s.root_token is not None])
        chunks = self._next_chunks([s for s in running if s.root_token is None])
        for sequence, tree in trees:
            self._guarded(self._draft_ahead, sequence, tree)
        outputs = self._verify(trees, chunks)
        if outputs is not None:
            tree_outputs, chunk_outputs = outputs
            for (sequence, tree), output in zip(trees, tree_outputs, strict=True):
                acceptance = self._guarded(accept, sequence, tree, output, self.tokenizer)
                if acceptance is not None:
                    self._guarded(self._commit, sequence, tree, output, acceptance)
            for (sequence, tokens), output in zip(chunks, chunk_outputs, strict=True):
                self._guarded(self._read_prompt, sequence, tokens, output)
        for sequence in self._active:
            sequence.send_event()
        self._retire()

    def _running(self) -> list[Sequence]:
        """The active sequences still running: a cancelled or overdue one ends here."""
        now = time.monotonic()
        for sequence in self._active:
            if sequence.cancelled.is_set():
                sequence.finish("cancelled")  # no-op for a sequence already finished
            elif self._is_past_due(sequence, now):
                sequence.finish("timeout")
        return [s for s in self._active if not s.is_finished]

    def _is_past_due(self, sequence: Sequence, now: float) -> bool:
        drain = self._drain_deadline
        return (sequence.deadline is not None and now > sequence.deadline) or \
            (drain is not None and now > drain)

    def _expire_waiting(self) -> None:
        """Drop waiting requests that were cancelled, are past due, or meet a shutdown."""
        now = time.monotonic()
        with self._wakeup:
            waiting, self._waiting = self._waiting, deque()
            for sequence in waiting:
                if sequence.cancelled.is_set():
                    sequence.finish("cancelled")
                elif self.is_draining or (sequence.deadline is not None
                                          and now > sequence.deadline):
                    sequence.finish("rejected")
                else:
                    self._waiting.append(sequence)
                    continue
                sequence.send_event()

    def _admit(self) -> None:
        """Refuse what can no longer wait; give waiting sequences a slot. Their prompts are
        read over the next steps (all but the prefix the slot may still hold from an earlier
        request)."""
        self._expire_waiting()
        while self._waiting and self.target.num_free_slots:
            with self._wakeup:
                sequence = self._waiting.popleft()
            # (a kept prefix is not evaluated again: the prompt's logprobs need all of it)
            sequence.slot = slot = self.target.acquire_slot(
                () if sequence.prompt_logprobs else sequence.prompt_tokens)
            sequence.admitted_at = time.monotonic()
            if self.choice is not None:
                sequence.mode = self.choice.pick()
                self.counters.add_request(sequence.mode.name)
            proposer = self._proposer(sequence)
            kept = self.target.num_cached(slot)  # a prompt prefix kept from an earlier request
            if kept and proposer is not None:
                # a draft model needs the features of every prompt token: keep only what the
                # draft state of this slot has seen
                usable = proposer.reusable(slot, sequence.prompt_tokens, kept)
                if usable < kept:
                    self.target.truncate(slot, usable)
                    kept = usable
            sequence.num_prompt_read = kept
            self._active.append(sequence)

    def _proposer(self, sequence: Sequence) -> Proposer | None:
        return self.proposer if sequence.mode is None else sequence.mode.proposer

    def _budget(self, sequence: Sequence) -> Budget | None:
        return self.budget if sequence.mode is None else sequence.mode.budget

    def _draft(self, sequences: list[Sequence]) -> list[tuple[Sequence, DraftTree]]:
        """A tree for each decoding sequence (just its root when there is no proposer)."""
        trees = []
        for sequence in sequences:
            if self._proposer(sequence) is None:
                trees.append((sequence, DraftTree.root_only(sequence.root_token)))
                continue
            started = time.perf_counter()
            tree = self._guarded(self._propose, sequence)
            sequence.draft_seconds = sequence.launch_seconds + time.perf_counter() - started
            sequence.launch_seconds = 0.0
            if tree is not None:
                trees.append((sequence, tree))
        return trees

    def _propose(self, sequence: Sequence) -> DraftTree:
        tree = self._budget(sequence).propose(self._proposer(sequence), sequence)
        if sequence.grammar is not None:
            tree, sequence.forced_in_tree = constrain_tree(
                tree, sequence.grammar, self.target.config.max_tree_nodes)
        if self.target.chains_only:
            tree = tree.best_chain()
        self.target.check_tree(TreeRequest(sequence.slot, tree.tokens, tree.parents))
        return tree

    def _draft_ahead(self, sequence: Sequence, tree: DraftTree) -> None:
        """Grow the next trees while the target verifies this one, where that pays."""
        proposer, budget = self._proposer(sequence), self._budget(sequence)
        sequence.drafting_ahead = False
        if getattr(proposer, "pipelined", False) and len(tree.tokens) > 1 \
                and budget.draft_ahead_due(sequence):
            sequence.drafting_ahead = proposer.draft_ahead(sequence.draft_state, tree,
                                                           budget.growth_levels)

    def _launch(self, sequence: Sequence) -> None:
        """Start the sequence's next tree now (where the proposer drafts ahead)."""
        started = time.perf_counter()
        self._proposer(sequence).launch(sequence.draft_state,
                                        self._budget(sequence).growth_levels)
        sequence.launch_seconds += time.perf_counter() - started

    def _next_chunks(self, sequences: list[Sequence]) -> list[tuple[Sequence, list[int]]]:
        """Up to chunk_size prompt tokens in all, oldest request first. Each chunk is as
        long as it would be for the request alone."""
        budget = self.chunk_size
        chunks = []
        for sequence in sequences:
            done = sequence.num_prompt_read
            tokens = sequence.prompt_tokens[done : done + self.chunk_size]
            if len(tokens) > budget:
                break
            chunks.append((sequence, tokens))
            budget -= len(tokens)
        return chunks

    def _verify(self, trees: list[tuple[Sequence, DraftTree]],
                chunks: list[tuple[Sequence, list[int]]]
                ) -> tuple[list[TreeOutput], list[ChunkOutput]] | None:
        """One target decode for every tree and prompt chunk; None if there was nothing to
        do or the decode failed (which ends the sequences in it)."""
        if not trees and not chunks:
            return None
        started = time.perf_counter()
        try:
            outputs = self.target.evaluate(
                [TreeRequest(s.slot, tree.tokens, tree.parents) for s, tree in trees],
                [PromptChunk(s.slot, tokens, features=self._reads_features(s),
                             logits=s.prompt_logprobs) for s, tokens in chunks])
        except Exception as error:
            log.exception("a target decode failed")
            for sequence, _ in (*trees, *chunks):
                sequence.fail(f"generation failed: {error}")
            return None
        self._verified = (started, time.perf_counter())
        seconds = self._verified[1] - started
        for sequence, _ in trees:
            sequence.verify_seconds = seconds
        if trees:
            self.counters.verify_seconds += seconds
        if chunks:
            self.counters.prompt_seconds += seconds
        elif self.budget is not None:  # what verifying this many tokens costs here
            self.budget.observe_decode(sum(len(tree.tokens) for _, tree in trees), seconds)
        return outputs

    def _reads_features(self, sequence: Sequence) -> bool:
        """Whether the sequence's prompt is read with features: unless its mode's proposer
        needs none (then llama.cpp computes the last token's logits only)."""
        return sequence.mode is None or sequence.mode.proposer.uses_features

    def _read_prompt(self, sequence: Sequence, tokens: list[int], output: ChunkOutput) -> None:
        """A prompt chunk was evaluated; after the last one, choose the first token."""
        if sequence.prompt_logprobs:
            sequence.add_prompt_logprobs(tokens, output.logits, self.tokenizer)
        sequence.num_prompt_read += len(tokens)
        proposer = self._proposer(sequence)
        if proposer is not None and proposer.uses_features:
            sequence.prompt_features.append(output.features)
        if sequence.num_prompt_read < len(sequence.prompt_tokens):
            return
        grammar = sequence.grammar
        token = choose_token(output.last_logits, sequence.params, sequence.token_counts,
                             sequence.rng, None if grammar is None else grammar.allowed())
        if grammar is not None and not self.tokenizer.is_end_of_generation(token):
            grammar.consume(token)
        sequence.record_step(num_drafted=0, num_accepted=0)
        sequence.root_token = token
        sequence.add_token(token, self.tokenizer, output.last_logits)
        if proposer is not None:
            if not sequence.is_finished:  # (a finished one's last event goes out with the step)
                sequence.send_event()  # the first token goes out before the proposer starts
            started = time.perf_counter()
            # sized for the longest request, so that every state can serve any request
            capacity = max(self.target.config.ctx_size,
                           len(sequence.prompt_tokens) + sequence.max_new_tokens) + 1
            sequence.draft_state = proposer.new_state(capacity, key=sequence.slot)
            features = np.concatenate(sequence.prompt_features) if proposer.uses_features \
                else None
            proposer.begin(sequence.draft_state, sequence.prompt_tokens, features, token)
            self._launch(sequence)
            sequence.prompt_features.clear()
            self.counters.draft_start_seconds += time.perf_counter() - started

    def _commit(self, sequence: Sequence, tree: DraftTree, output: TreeOutput,
                acceptance: Acceptance) -> None:
        """Keep the accepted path on both sides, record the new tokens."""
        new_tokens = [tree.tokens[node] for node in acceptance.path[1:]]
        new_tokens.append(acceptance.bonus_token)
        proposer, budget = self._proposer(sequence), self._budget(sequence)
        if proposer is not None:
            if sequence.drafting_ahead:  # what it waited for is the next tree's drafting time
                ahead = proposer.settle(sequence.draft_state, new_tokens, self._verified)
                sequence.launch_seconds += ahead.exposed
                self.counters.add_ahead(ahead)
            proposer.commit(sequence.draft_state, output.features[acceptance.path], new_tokens)
            if budget.expects_tree(sequence):
                self._launch(sequence)  # likely to draft again: start it now
        self.target.commit(sequence.slot, acceptance.path)
        sequence.record_step(num_drafted=tree.num_drafted, num_accepted=acceptance.num_accepted)
        self.counters.add_step(tree.num_drafted, acceptance.num_accepted, sequence.draft_seconds)
        sources = token_sources(tree, acceptance.path, sequence.forced_in_tree,
                                getattr(proposer, "source", None))  # (none: plain decoding)
        forced = sources.count("forced")
        sequence.forced_in_tree = 0
        sequence.num_forced += forced
        self.counters.forced_tokens += forced
        sequence.root_token = acceptance.bonus_token
        for node, token, source in zip(acceptance.path, new_tokens, sources, strict=True):
            sequence.add_token(token, self.tokenizer, output.logits[node], source)  # chosen at node
            if sequence.is_finished:
                break
        if budget is not None:  # judged on what the proposers drafted
            budget.observe(sequence, tree, acceptance.num_accepted - forced)

    def _guarded(self, work, sequence: Sequence, *args):
        """A failure in one sequence ends that sequence with an error, not the engine;
        returns work's result, or None after a failure."""
        try:
            return work(sequence, *args)
        except Exception as error:
            log.exception("request %s failed", sequence.request_id)
            sequence.fail(f"generation failed: {error}")
            return None

    def _retire(self) -> None:
        still_active = []
        for sequence in self._active:
            if sequence.is_finished:
                slot = sequence.slot
                if slot is not None:
                    self.target.release_slot(slot)
                    sequence.slot = None
                if sequence.draft_state is not None:  # kept for the slot's next request
                    self._proposer(sequence).release(sequence.draft_state, key=slot)
                    sequence.draft_state = None
                if sequence.mode is not None and sequence.finish_reason in ("stop", "length"):
                    self.choice.observe(sequence.mode, time.monotonic() - sequence.admitted_at,
                                        len(sequence.output_tokens))
            else:
                still_active.append(sequence)
        self._active = still_active
        counters = self.counters
        counters.kv_cells_used, counters.kv_cells_cached = self.target.kv_cells()
