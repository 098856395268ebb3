"""EAGLE-2 tree growth kept on the draft's device: fixed shapes, one copy back per tree.

`Proposer._grow` drives the levels from the host: per level it builds the attention mask in
numpy, copies it over, and reads the top-k back to choose the next frontier — a round trip
and a handful of small launches per level, which on a GPU cost more than the level's
arithmetic. Here everything after the catch-up stays on the device: each level's frontier
(the best top_k of its k × k children by cumulative log-probability), the masks (an
ancestor-slot row per frontier node), the cache slots and positions. Every level has the
same shapes (k rows attending over the whole cache, masked), so on CUDA the growth of a
sequence is captured once as a CUDA graph and each tree is one replay and one copy of its
candidates into pinned host memory, started without waiting (`start`) and collected when
the tree is needed (`collect`). On a CPU the same code runs eagerly (tests use it).

Outputs, for levels 1…depth: the children's tokens and log-probs [depth, k, k] (level 1
uses row 0: the root's children) and `chosen` [depth, k], each level's frontier as flat
indices into its k × k children, best first. `DeviceGrowth.replay_into` rebuilds the same
candidates in a `TreeBuilder`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from draft_model.model import DraftModel, KVCache
from draft_model.tree import TreeBuilder

log = logging.getLogger("dovetail.draft")


class DeviceGrowth:
    def __init__(self, model: DraftModel, cache: KVCache, top_k: int, depth: int,
                 use_graph: bool) -> None:
        self.model, self.cache = model, cache
        self.top_k, self.depth = top_k, depth
        device, dtype = cache.keys.device, cache.keys.dtype
        self.root_hidden = torch.zeros(model.config.hidden_size, device=device, dtype=dtype)
        self.committed = torch.ones((), dtype=torch.long, device=device)
        self.child_tokens = torch.zeros(depth, top_k, top_k, dtype=torch.long, device=device)
        self.child_log_probs = torch.zeros(depth, top_k, top_k, device=device)
        self.chosen = torch.zeros(depth, top_k, dtype=torch.long, device=device)
        self.true = torch.ones((), dtype=torch.bool, device=device)  # no host scalar in a graph
        self.use_graph = use_graph and device.type == "cuda"
        self.capture_failed = False
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, ...] = ()  # the started growth's, on the host
        if self.use_graph:
            pinned = {"pin_memory": True}
            self.host = (torch.empty(self.child_tokens.shape, dtype=torch.long, **pinned),
                         torch.empty(self.child_log_probs.shape, **pinned),
                         torch.empty(self.chosen.shape, dtype=torch.long, **pinned))
            self.done = torch.cuda.Event()

    def start(self, root_hidden: torch.Tensor, committed: int) -> None:
        """Queue the growth below root_hidden [H] (it predicts the root's children);
        `committed` cache slots hold committed pairs. On CUDA this returns at once: the
        replay and the copies into pinned memory run while the host goes on; `collect`
        waits for them."""
        self.root_hidden.copy_(root_hidden)
        self.committed.fill_(committed)
        if not self.use_graph:
            self._levels()
            self.outputs = (self.child_tokens.cpu(), self.child_log_probs.cpu(),
                            self.chosen.cpu())
            return
        if not self.prepare():
            self.start(root_hidden, committed)  # eagerly, on the device
            return
        self.graph.replay()
        for host, device in zip(self.host, (self.child_tokens, self.child_log_probs,
                                            self.chosen), strict=True):
            host.copy_(device, non_blocking=True)
        self.done.record()
        self.outputs = self.host

    def collect(self, builder: TreeBuilder) -> None:
        """Add the started growth's candidates to builder (waiting for the device)."""
        if self.use_graph:
            self.done.synchronize()
        self.replay_into(builder, *(t.numpy() for t in self.outputs))

    def replay_into(self, builder: TreeBuilder, child_tokens: np.ndarray,
                    child_log_probs: np.ndarray, chosen: np.ndarray) -> None:
        frontier = [0]
        for level in range(self.depth):
            rows = len(frontier)
            new_ids = builder.add_level(frontier, child_tokens[level, :rows],
                                        child_log_probs[level, :rows])
            frontier = [new_ids[j] for j in chosen[level].tolist()]

    def prepare(self) -> bool:
        """Capture the growth as a CUDA graph unless it is; False (and eager growth from now
        on) where the capture fails — an operation this PyTorch or driver cannot capture
        must not take the server down, only cost it the launch overhead."""
        if self.graph is not None:
            return True
        if not self.use_graph:
            return False
        try:
            self._capture()
        except RuntimeError as error:
            log.warning("the draft's tree growth could not be captured as a CUDA graph (%s); "
                        "growing trees eagerly on the device", error)
            self.graph, self.use_graph, self.capture_failed = None, False, True
            return False
        return True

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (allocator, kernels)
            for _ in range(2):
                self._levels()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._levels()

    @torch.inference_mode()
    def _levels(self) -> None:
        """The whole growth in tensor operations of fixed shapes (capturable)."""
        model, k = self.model, self.top_k
        capacity = self.cache.capacity
        device = self.root_hidden.device
        rows = torch.arange(k, device=device)
        committed_slots = (torch.arange(capacity, device=device) < self.committed)[None]

        tokens, log_probs = self._top_children(self.root_hidden[None])  # [1, k] each
        self.child_tokens[0, 0] = tokens[0]
        self.child_log_probs[0, 0] = log_probs[0]
        self.chosen[0] = rows  # topk is sorted: the root's children in order, best first
        scores, frontier_tokens = log_probs[0], tokens[0]
        frontier_hidden = self.root_hidden.expand(k, -1)
        ancestors = torch.zeros(k, capacity, dtype=torch.bool, device=device)
        for level in range(2, self.depth + 1):
            slots = self.committed + (level - 2) * k + rows  # this level's scratch slots
            ancestors = ancestors.clone()
            ancestors.index_put_((rows, slots), self.true)  # sees itself and its ancestors
            positions = (self.committed + level - 2).expand(1, k)
            outputs = model(frontier_hidden[None], frontier_tokens[None], positions,
                            self.cache, slots, ancestors | committed_slots)[0]  # [k, H]
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
        return top_children(self.model, hidden, self.top_k)


def top_children(model: DraftModel, hidden: torch.Tensor,
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [P, H] → target token ids and log-probs of the draft's top k, each [P, k]."""
    log_probs = torch.log_softmax(model.head_logits(hidden).float(), dim=-1)
    top = torch.topk(log_probs, k, dim=-1)
    return model.head_token_ids[top.indices], top.values
