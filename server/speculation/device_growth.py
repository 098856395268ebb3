"""EAGLE-2 tree growth kept on the draft's device: fixed shapes, one copy back per tree.

This is the one growth rule the draft proposer uses. Driving the levels from the host (a
mask built per level, the top-k read back to choose the next frontier) would cost a round
trip and a handful of small launches per level, which on a GPU cost more than the level's
arithmetic. Here the catch-up on the pairs the target accepted last step and the whole
growth stay on the device: each level's frontier (the best top_k of its k × k children by
cumulative log-probability), the masks (an ancestor-slot row per frontier node), the cache
slots and positions. The catch-up always runs `max_pending` rows (the accepted pairs, then
padding whose keys land in scratch slots no mask lets anyone see), and every level has the
same shapes (k rows attending over the whole cache, masked), so on CUDA a sequence's
catch-up and growth are captured once as one CUDA graph: each tree is two copies in from
pinned host memory, one replay and one copy of its candidates back into pinned memory,
started without waiting (`start`) and collected when the tree is needed (`collect`). On a
CPU the same code runs eagerly.

Outputs, for levels 1…depth: the children's tokens and log-probs [depth, k, k] (level 1
uses row 0: the root's children), `chosen` [depth, k], each level's frontier as flat
indices into its k × k children, best first, and `expanded` [depth, k, H], the draft's
output at each node it expanded (its prediction of that node's feature: what a pre-drafted
next tree stands in for the target's features, server/speculation/pipeline.py).
`DeviceGrowth.replay_into` rebuilds the same candidates in a `TreeBuilder`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from draft_model.model import DraftModel, KVCache
from server.speculation.tree import TreeBuilder

log = logging.getLogger("dovetail.draft")


class DeviceGrowth:
    def __init__(self, model: DraftModel, cache: KVCache, top_k: int, depth: int,
                 max_pending: int, use_graph: bool) -> None:
        self.model, self.cache = model, cache
        self.top_k, self.depth = top_k, depth
        self.max_pending = max_pending  # pairs one catch-up takes (more: see DraftProposer.launch)
        device = cache.keys.device
        hidden_size = model.config.hidden_size
        # The pending pairs' features; their tokens, then the first cache slot they go to
        # and their count (an index to a 0-dim host scalar would sync, so it is all here).
        self.features = torch.zeros(max_pending, hidden_size, device=device)
        self.ints = torch.zeros(max_pending + 2, dtype=torch.long, device=device)
        self.ints[-1] = 1
        self.child_tokens = torch.zeros(depth, top_k, top_k, dtype=torch.long, device=device)
        self.child_log_probs = torch.zeros(depth, top_k, top_k, device=device)
        self.chosen = torch.zeros(depth, top_k, dtype=torch.long, device=device)
        self.expanded = torch.zeros(depth, top_k, hidden_size, device=device)
        self.true = torch.ones((), dtype=torch.bool, device=device)  # no host scalar in a graph
        self.use_graph = use_graph and device.type == "cuda"
        self.capture_failed = False
        # one graph per number of levels grown (see `start`), all in one memory pool
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.outputs: tuple[torch.Tensor, ...] = ()  # the started growth's, on the host
        self.levels = depth  # the started growth's
        if self.use_graph:
            pinned = {"pin_memory": True}
            self.host = (torch.empty(self.child_tokens.shape, dtype=torch.long, **pinned),
                         torch.empty(self.child_log_probs.shape, **pinned),
                         torch.empty(self.chosen.shape, dtype=torch.long, **pinned),
                         torch.empty(self.expanded.shape, **pinned))
            self.staged_features = torch.zeros(self.features.shape, **pinned)
            self.staged_ints = torch.zeros(self.ints.shape, dtype=torch.long, **pinned)
            self.done = torch.cuda.Event()

    def start(self, features: np.ndarray, tokens: list[int], start: int, levels: int) -> None:
        """Queue the catch-up on pending pairs — features [c, H] of the target and the
        tokens after them, c ≤ max_pending, going to cache slots start… — and `levels`
        levels of growth (at most depth) below the last one's output (which predicts the
        root's children). On CUDA this returns at once: the copies in, the replay and the
        copies out run while the host goes on; `collect` waits for them."""
        count = len(tokens)
        if not 0 < count <= self.max_pending or len(features) != count:
            raise ValueError(f"{count} pending pairs for a catch-up of 1..{self.max_pending}")
        if not 1 <= levels <= self.depth:
            raise ValueError(f"{levels} levels for a growth of 1..{self.depth}")
        self.levels = levels
        if levels in self.graphs:  # captured: through pinned memory, without waiting
            self.done.synchronize()  # the staging buffers may still feed the last copy in
            self.staged_features[:count] = torch.from_numpy(features)
            ints = self.staged_ints.numpy()
            ints[:count], ints[-2], ints[-1] = tokens, start, count
            self.features.copy_(self.staged_features, non_blocking=True)
            self.ints.copy_(self.staged_ints, non_blocking=True)
        else:  # before the capture too: its warm-up runs must see this catch-up's pairs
            self.features[:count] = torch.from_numpy(features).to(self.features.device)
            self.ints[:count] = torch.tensor(tokens)
            self.ints[-2], self.ints[-1] = start, count
        if self.use_graph and self.prepare(levels):
            self.graphs[levels].replay()
            for host, device in zip(self.host, self._outputs, strict=True):
                host.copy_(device, non_blocking=True)
            self.done.record()
            self.outputs = self.host
            return
        # eagerly, on the device: attending only to the slots in use (a graph's shapes are
        # fixed, so it attends over the whole cache, masked)
        self._run(levels, width=start + self.max_pending + (levels - 1) * self.top_k)
        self.outputs = tuple(tensor.cpu() for tensor in self._outputs)

    @property
    def _outputs(self) -> tuple[torch.Tensor, ...]:
        return self.child_tokens, self.child_log_probs, self.chosen, self.expanded

    def wait(self) -> None:
        """Until the started growth is done on the device."""
        if self.use_graph:
            self.done.synchronize()

    def collect(self, builder: TreeBuilder) -> dict[int, np.ndarray]:
        """Add the started growth's candidates to builder (waiting for the device); returns
        the draft's output at each expanded candidate, by candidate id."""
        self.wait()
        return self.replay_into(builder, *(t.numpy() for t in self.outputs))

    def replay_into(self, builder: TreeBuilder, child_tokens: np.ndarray,
                    child_log_probs: np.ndarray, chosen: np.ndarray,
                    expanded: np.ndarray | None = None,
                    levels: int | None = None) -> dict[int, np.ndarray]:
        """Rebuild the candidates of a growth of `levels` levels (default: the started
        one's) from its outputs; returns the draft's output at each expanded candidate."""
        frontier, outputs = [0], {}
        for level in range(self.levels if levels is None else levels):
            rows = len(frontier)
            if expanded is not None:
                outputs.update(zip(frontier, expanded[level, :rows].copy(), strict=True))
            new_ids = builder.add_level(frontier, child_tokens[level, :rows],
                                        child_log_probs[level, :rows])
            frontier = [new_ids[j] for j in chosen[level].tolist()]
        return outputs

    def prepare(self, levels: int) -> bool:
        """Capture the catch-up and `levels` levels of growth as a CUDA graph unless they
        are; False (and eager growth from now on) where the capture fails
        — an operation this PyTorch or driver cannot capture must not take the server down,
        only cost it the launch overhead."""
        if levels in self.graphs:
            return True
        if not self.use_graph:
            return False
        try:
            self._capture(levels)
        except RuntimeError as error:
            log.warning("the draft's tree growth could not be captured as a CUDA graph (%s); "
                        "growing trees eagerly on the device", error)
            self.graphs, self.use_graph, self.capture_failed = {}, False, True
            return False
        return True

    def _capture(self, levels: int) -> None:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (allocator, kernels)
            for _ in range(2):
                self._run(levels)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # One pool for all of them: they run one at a time on one stream, and every result
        # is copied into buffers made outside the pool, so no graph's memory outlives it.
        with torch.cuda.graph(graph, pool=self.pool):
            self._run(levels)
        self.graphs[levels] = graph

    @torch.inference_mode()
    def _run(self, levels: int, width: int | None = None) -> None:
        """The catch-up and `levels` levels of growth in tensor operations of fixed shapes
        (capturable). width: the cache slots attended over (default: all of them)."""
        model, k = self.model, self.top_k
        capacity = self.cache.capacity if width is None else min(width, self.cache.capacity)
        device = self.features.device
        start, count = self.ints[-2], self.ints[-1]
        # The catch-up: row i is pair start + i, at that cache slot and position, and sees
        # every slot up to its own. Padding rows (i ≥ count) write scratch slots only.
        positions = start + torch.arange(self.max_pending, device=device)
        sees = torch.arange(capacity, device=device)[None] <= positions[:, None]
        hidden = model(self.features[None], self.ints[None, :-2], positions[None], self.cache,
                       positions, sees)[0]
        root_hidden = hidden.index_select(0, (count - 1)[None])  # [1, H]: the last pair's
        committed = start + count

        rows = torch.arange(k, device=device)
        committed_slots = (torch.arange(capacity, device=device) < committed)[None]
        tokens, log_probs = self._top_children(root_hidden)  # [1, k] each
        self.child_tokens[0, 0] = tokens[0]
        self.child_log_probs[0, 0] = log_probs[0]
        self.chosen[0] = rows  # topk is sorted: the root's children in order, best first
        self.expanded[0, 0] = root_hidden[0]
        scores, frontier_tokens = log_probs[0], tokens[0]
        frontier_hidden = root_hidden.expand(k, -1)
        ancestors = torch.zeros(k, capacity, dtype=torch.bool, device=device)
        for level in range(2, levels + 1):
            slots = committed + (level - 2) * k + rows  # this level's scratch slots
            ancestors = ancestors.clone()
            ancestors.index_put_((rows, slots), self.true)  # sees itself and its ancestors
            positions = (committed + level - 2).expand(1, k)
            outputs = model(frontier_hidden[None], frontier_tokens[None], positions,
                            self.cache, slots, ancestors | committed_slots)[0]  # [k, H]
            self.expanded[level - 1] = outputs
            tokens, log_probs = self._top_children(outputs)  # [k, k] each
            self.child_tokens[level - 1] = tokens
            self.child_log_probs[level - 1] = log_probs
            best = torch.topk((scores[:, None] + log_probs).flatten(), k)
            self.chosen[level - 1] = best.indices
            parent_rows = best.indices // k
            scores = best.values
            frontier_tokens = tokens.flatten()[best.indices]
            frontier_hidden = outputs[parent_rows]
            ancestors = ancestors[parent_rows]

    def _top_children(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [P, H] → target token ids and log-probs of the draft's top k, each
        [P, k]."""
        log_probs = torch.log_softmax(self.model.head_logits(hidden).float(), dim=-1)
        top = torch.topk(log_probs, self.top_k, dim=-1)
        return self.model.head_token_ids[top.indices], top.values
