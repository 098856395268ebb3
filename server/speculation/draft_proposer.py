"""Drafting for one sequence: catch up on accepted tokens, then grow a tree level by level.

Draft positions: the pair (f_t, x_{t+1}) sits at position t and, for committed pairs, at
cache slot t. After the catch-up the last committed pair ends with the root token; a node at
depth d of the tree is expanded by the pair (its parent's draft output, its token) at
position C − 1 + d, written to a scratch slot after the committed ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from draft_model.model import DraftModel, KVCache
from server.speculation.device_growth import DeviceGrowth
from server.speculation.draft_ahead import (
    AheadReport,
    DraftWorker,
    Grown,
    Pacing,
    Predraft,
    likely_outcomes,
    settle_predrafts,
    tree_below_bonus,
)
from server.speculation.tree import DraftTree, TreeBuilder


@dataclass(frozen=True)
class TreeShape:
    top_k: int = 10  # children per expanded node, and nodes expanded per level
    depth: int = 7  # levels of candidates below the root
    total_tokens: int = 16  # nodes verified by the target, root included

    @property
    def max_scratch_slots(self) -> int:
        return self.top_k * self.depth


@dataclass
class DraftState:
    """The draft side of one sequence (kept for the next one in its target slot)."""

    cache: KVCache
    num_committed: int = 0  # pairs in the cache (slots 0..num_committed-1)
    # pairs accepted by the target but not yet run through the draft
    pending_features: list[np.ndarray] = field(default_factory=list)  # each [m, H]
    pending_tokens: list[int] = field(default_factory=list)
    growth: DeviceGrowth | None = None  # with device growth: its buffers (and CUDA graph)
    launched: bool = False  # with device growth: a tree below the last catch-up is started
    # What the target has verified, by position — so that a later request on the same
    # target slot, which keeps a prefix of it, catches up on the rest only.
    seen_tokens: list[int] = field(default_factory=list)
    seen_features: np.ndarray | None = None  # [≥ len(seen_tokens), H]: row t is f_t
    next_token: int = -1  # verified next (the root): its feature comes with the next commit
    grown: tuple | None = None  # the last tree's (TreeBuilder, outputs), for drafting ahead
    predrafts: list[Predraft] = field(default_factory=list)  # drafted ahead, until settled
    hit: Predraft | None = None  # the one whose guess came true, until the commit
    ahead: Predraft | None = None  # after the commit: the next tree is in it


class DraftProposer:
    """The DGF draft's EAGLE-2 trees. Each tree is grown by DeviceGrowth (on CUDA one
    captured graph per state; elsewhere the same tensor code, eagerly) and can be started
    early (`launch`), right after a step's commit, so the draft works while the host goes
    on."""

    uses_features = True
    source = "draft"  # what the chat page calls its tokens

    def __init__(self, model: DraftModel, shape: TreeShape, pipeline: bool = False,
                 max_guesses: int = 4) -> None:
        """pipeline: draft the next tree while the target verifies this one
        (`draft_ahead`, server/speculation/draft_ahead.py), below up to max_guesses
        outcomes: as many as the draft grows in the time of a verification."""
        self.model = model.eval()
        self.shape = shape
        self.worker = DraftWorker() if pipeline else None
        self.pacing = Pacing(max_guesses)
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.use_graph = True  # until a capture fails: then eager growth for every sequence
        self.released: list[DraftState] = []  # states free for any sequence
        self.by_key: dict[int, DraftState] = {}  # released under a key (the engine: its slot)
        self.num_states = 0  # states made so far

    def new_state(self, capacity: int, key: int | None = None) -> DraftState:
        """capacity: the longest sequence (prompt + completion) this state will hold; key:
        the target slot the sequence runs in.

        The state last released under `key` comes back with what it has seen, so that
        `begin` may take a prefix the target kept (see `reusable`); else a released state
        that is large enough, else a new one. Reuse keeps the cache and, on CUDA, the tree
        growth's buffers and captured graph: a new cache per request would mean a new graph
        capture (and allocations, and the old graph's teardown) before every first token."""
        needed = capacity + self.shape.max_scratch_slots
        state = self.by_key.pop(key, None) if key is not None else None
        if state is not None:
            if state.cache.capacity >= needed:
                return state
            bigger = self._allocate(needed)  # the pairs are recomputed from what it has seen
            bigger.seen_tokens, bigger.seen_features = state.seen_tokens, state.seen_features
            return bigger
        for index, state in enumerate(self.released):
            if state.cache.capacity >= needed:
                state = self.released.pop(index)
                state.seen_tokens.clear()
                return state
        return self._allocate(needed)

    def _allocate(self, capacity: int) -> DraftState:
        self.num_states += 1
        return DraftState(KVCache.allocate(self.model.config, capacity, self.device,
                                           self.dtype))

    def release(self, state: DraftState, key: int | None = None) -> None:
        """The sequence is done with state: keep it (under key) for the next one. A tree
        launched and never collected may still be growing on the device; the next
        sequence's work is queued behind it on the same stream, and a stale cache slot is
        never attended to (masks cover committed and this tree's scratch slots only)."""
        for predraft in state.predrafts:  # trees drafted ahead may still grow in its cache
            try:
                predraft.future.result()
            except Exception:  # (the first carried committed pairs: forget them)
                state.num_committed = 0
                state.seen_tokens.clear()
        state.predrafts.clear()
        state.grown = state.hit = state.ahead = None
        state.pending_features.clear()
        state.pending_tokens.clear()
        state.launched = False
        if key is None:
            self.released.append(state)
            return
        if key in self.by_key:
            self.released.append(self.by_key[key])
        self.by_key[key] = state

    def reusable(self, key: int, prompt_tokens: list[int], kept: int) -> int:
        """How many of the `kept` prompt tokens (a prefix the target holds from an earlier
        request in slot `key`) the state under key has seen: their features are known, so
        the draft need not be given them again."""
        state = self.by_key.get(key)
        if state is None:
            return 0
        seen, shared = state.seen_tokens, 0
        while shared < min(kept, len(seen)) and seen[shared] == prompt_tokens[shared]:
            shared += 1
        return shared

    @torch.inference_mode()
    def warm_up(self, count: int, capacity: int) -> None:
        """Prepare `count` states for sequences of up to `capacity` tokens now (at start-up)
        rather than at the first requests: with device growth on CUDA, each one's tree
        growth is captured as a CUDA graph here."""
        if self.device.type != "cuda":
            return
        states = [self.new_state(capacity) for _ in range(count)]
        for state in states:
            state.growth = self._growth_for(state)
            for depth in range(1, self._max_depth + 1):  # the budget may ask for any
                state.growth.prepare(depth)
            self.release(state)

    def begin(self, state: DraftState, prompt_tokens: list[int], prompt_features: np.ndarray,
              root_token: int) -> None:
        """After the target's prefill: pairs (f_t, x_{t+1}) for the prompt and the root.

        prompt_features are the features of the prompt's last tokens, the ones the target
        read; the tokens before them (a prefix it kept from an earlier request) must be ones
        this state has seen (`reusable`). Pairs of that prefix already in the cache stay."""
        start = len(prompt_tokens) - len(prompt_features)
        if state.seen_tokens[:start] != list(prompt_tokens[:start]):
            raise ValueError(f"the draft has not seen the {start} prompt tokens the target kept")
        state.num_committed = min(state.num_committed, max(start - 1, 0))
        first = state.num_committed
        state.pending_features = [prompt_features]
        if first < start:  # the kept prefix's last features: its pairs are not in the cache
            state.pending_features.insert(0, state.seen_features[first:start].copy())
        state.pending_tokens = [*prompt_tokens[first + 1:], root_token]
        del state.seen_tokens[start:]
        self._record(state, prompt_tokens[start:], prompt_features)
        state.next_token = root_token

    def commit(self, state: DraftState, path_features: np.ndarray,
               next_tokens: list[int]) -> None:
        """The target accepted a path: path_features [m+1, H] are its features at the root
        and the accepted nodes; next_tokens the m accepted tokens plus the bonus token.

        This is the draft's only KV rollback: the tree's scratch slots lie after
        num_committed and are simply overwritten by the next catch-up. So are the stand-ins
        of trees drafted ahead (`draft_ahead`): if one's guess came true, its subtree is
        the next tree (`launched`), else they are dropped.
        """
        if state.predrafts:  # (not settled by the caller)
            self.settle(state, next_tokens)
        state.ahead, state.hit = state.hit, None
        state.launched = state.ahead is not None
        state.pending_features.append(path_features)
        state.pending_tokens.extend(next_tokens)
        self._record(state, [state.next_token, *next_tokens[:-1]], path_features)
        state.next_token = next_tokens[-1]

    @staticmethod
    def _record(state: DraftState, tokens: list[int], features: np.ndarray) -> None:
        """Append verified tokens and their features to what the state has seen."""
        start, end = len(state.seen_tokens), len(state.seen_tokens) + len(tokens)
        seen = state.seen_features
        if seen is None or len(seen) < end:
            grown = np.empty((max(end, state.cache.capacity), features.shape[1]), np.float32)
            if seen is not None:
                grown[:start] = seen[:start]
            state.seen_features = seen = grown
        seen[start:end] = features
        state.seen_tokens.extend(tokens)

    @torch.inference_mode()
    def launch(self, state: DraftState, levels: int | None = None) -> None:
        """Start the next tree now: the catch-up on the pending pairs and `levels` levels of
        growth (default: the shape's depth) are queued on the device, and `propose` collects
        them. The engine calls this as soon as a step's accepted tokens are committed, so a
        GPU drafts while the host commits the target's cache, streams tokens and looks up
        the next step's proposal (on a CPU the growth simply runs here). Nothing to do
        where a tree below the current root is launched already (or was drafted ahead)."""
        if state.launched or not state.pending_tokens:
            return
        if not self._has_room(state):
            self._catch_up(state)  # no tree: the pairs still go in
            return
        # a long backlog (a prompt, steps without a tree) goes in eagerly but its last pairs
        excess = len(state.pending_tokens) - self._max_pending
        if excess > 0:
            self._catch_up(state, excess)
        features = np.concatenate(state.pending_features)
        state.growth = growth = self._growth_for(state)
        tokens, start, levels = state.pending_tokens, state.num_committed, self._levels(levels)
        self._on_device(lambda: growth.start(features, tokens, start, levels))
        if growth.capture_failed:
            self.use_graph = False
        state.num_committed += len(state.pending_tokens)
        state.pending_features.clear()
        state.pending_tokens.clear()
        state.launched = True

    def draft_ahead(self, state: DraftState, tree: DraftTree,
                    levels: int | None = None) -> bool:
        """While the target verifies `tree`: start growing next trees, each below one of
        the paths the draft finds likeliest to be accepted with a bonus token it drafts,
        its outputs standing in for the target's features on that path
        (server/speculation/draft_ahead.py); as many as fit in a verification's time. The
        pairs the target accepted last step go first into each, with their true features.
        False where there is no worker, no guess, or no room."""
        if self.worker is None or state.grown is None or state.launched:
            return False
        guesses = likely_outcomes(Grown.of(*state.grown), tree, self.shape.top_k,
                                  self.pacing.guesses)
        guesses = [guess for guess in guesses if state.pending_tokens or guess.tokens]
        if not guesses:
            return False
        longest = max(len(guess.tokens) for guess in guesses)
        excess = len(state.pending_tokens) + longest - self._max_pending
        if excess > 0:  # a backlog: eagerly, but for the pairs the catch-up takes
            self._catch_up(state, min(excess, len(state.pending_tokens)))
        if not self._has_room(state, extra=longest) \
                or len(state.pending_tokens) + longest > self._max_pending:
            return False
        growth, start = self._growth_for(state), state.num_committed
        state.growth = growth
        levels = self._levels(None if levels is None else levels + 1)  # + the bonus's level
        for guess in guesses:
            features = np.concatenate([*state.pending_features, guess.stand_ins])
            tokens = [*state.pending_tokens, *guess.tokens]

            def grow(features=features, tokens=tokens) -> tuple:
                with torch.inference_mode():
                    growth.start(features, tokens, start, levels)
                    growth.wait()
                    return tuple(output.clone() for output in growth.outputs)

            state.predrafts.append(Predraft(guess.tokens, levels, self.worker.submit(grow)))
        state.num_committed += len(state.pending_tokens)  # true pairs: committed by each
        state.pending_features.clear()
        state.pending_tokens.clear()
        state.grown = None
        return True

    def settle(self, state: DraftState, next_tokens: list[int],
               verified: tuple[float, float] | None = None) -> AheadReport:
        """The step's outcome is known: the trees drafted ahead that are still of use are
        waited for, the rest dropped (see draft_ahead.settle_predrafts); `commit` then takes the one
        whose guess came true. verified: when the verification ran (perf_counter)."""
        hit, report = settle_predrafts(state.predrafts, list(next_tokens), verified)
        state.predrafts.clear()
        state.hit = hit
        self.pacing.observe(report, verified)
        return report

    def _on_device(self, work) -> None:
        """Run draft work now; with a worker, on its thread (waiting for it), so that all
        device work comes from one thread: no graph capture while another thread launches."""
        if self.worker is None:
            work()
            return

        def run() -> None:
            with torch.inference_mode():
                work()
        self.worker.run(run)

    @property
    def pipelined(self) -> bool:
        return self.worker is not None

    @property
    def _max_pending(self) -> int:
        """Pairs the device growth's own catch-up takes: a drafted step's accepted path and
        bonus token fit (at most total_tokens), so only backlogs need an eager one; drafting
        ahead adds the guessed path's stand-ins (at most depth + 1)."""
        ahead = self._max_depth + 1 if self.pipelined else 0
        return max(self.shape.total_tokens, 1) + ahead

    def _has_room(self, state: DraftState, extra: int = 0) -> bool:
        """A tree can grow after the pending pairs (and `extra` more): its scratch slots
        and the padded catch-up fit in the cache."""
        shape, capacity = self.shape, state.cache.capacity
        pending = len(state.pending_tokens) + extra
        committed = state.num_committed + pending
        first_padded = committed - min(pending, self._max_pending)
        return shape.total_tokens > 1 \
            and committed + shape.max_scratch_slots + shape.depth <= capacity \
            and first_padded + self._max_pending <= capacity

    def _growth_for(self, state: DraftState) -> DeviceGrowth:
        """The state's device growth (kept across sequences), made when it has none."""
        growth = state.growth
        if growth is None or growth.cache is not state.cache \
                or (growth.top_k, growth.depth, growth.max_pending) \
                != (self.shape.top_k, self._max_depth, self._max_pending) \
                or (growth.use_graph and not self.use_graph):
            growth = DeviceGrowth(self.model, state.cache, self.shape.top_k, self._max_depth,
                                  max_pending=self._max_pending, use_graph=self.use_graph)
        return growth

    @torch.inference_mode()
    def propose(self, state: DraftState, root_token: int,
                graft: tuple[list[int], list[float]] | None = None,
                levels: int | None = None) -> DraftTree:
        """The draft's tree below root_token (the one launched, or one grown now with
        `levels` levels). graft: (tokens, cumulative log-scores) of a chain from another
        proposer, ranked together with the draft's candidates."""
        shape = self.shape
        builder = TreeBuilder(root_token, shape.top_k, shape.total_tokens)
        self.launch(state, levels)  # unless launched already
        if state.launched:
            ahead, state.ahead = state.ahead, None
            if ahead is None:
                outputs = state.growth.collect(builder)
            else:  # drafted ahead
                builder, outputs = tree_below_bonus(ahead, state.growth, root_token,
                                                    shape.top_k, shape.total_tokens)
            if self.pipelined:  # what drafting ahead of this tree needs
                state.grown = builder, outputs  # (read only if drafting ahead)
            state.launched = False
        if graft is not None:
            builder.add_chain(*graft)
        return builder.finish()

    @property
    def _max_depth(self) -> int:
        return max(min(self.shape.depth, self.shape.total_tokens - 1), 1)

    def _levels(self, levels: int | None) -> int:
        """Levels a tree grows: the shape's, or fewer where the budget asks for fewer."""
        return self._max_depth if levels is None else min(max(levels, 1), self._max_depth)

    def _catch_up(self, state: DraftState, count: int | None = None) -> None:
        """Run the first `count` pending pairs (default: all) through the draft into
        committed cache slots (those that fit)."""
        if not state.pending_tokens:
            return
        features = np.concatenate(state.pending_features)
        count = len(state.pending_tokens) if count is None else count
        start = state.num_committed
        if start + count > state.cache.capacity:
            return
        feature_tensor = torch.from_numpy(features[:count])
        if self.device.type == "cuda":  # pinned: an asynchronous copy
            feature_tensor = feature_tensor.pin_memory().to(self.device, non_blocking=True)
        feature_tensor = feature_tensor.to(self.device, self.dtype)[None]
        tokens = torch.tensor([state.pending_tokens[:count]], device=self.device)
        positions = torch.arange(start, start + count, device=self.device)[None]
        mask = torch.ones(count, start + count, dtype=torch.bool, device=self.device)
        mask[:, start:] = torch.tril(mask[:, start:])
        self._on_device(lambda: self.model(feature_tensor, tokens, positions, state.cache,
                                           positions[0], mask))
        state.num_committed = start + count
        state.pending_features = [features[count:]] if count < len(features) else []
        del state.pending_tokens[:count]
