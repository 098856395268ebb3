"""A reference for the draft's tree growth: the straightforward host-driven level loop.

Per level it builds the attention mask in numpy and reads the top-k back to choose the next
frontier (TreeBuilder.add_children). Too slow to serve from (a round trip per level), but
simple enough to trust: tests check that DraftProposer's fixed-shape growth
(server/speculation/device_growth.py), started early or not, eager or as a CUDA graph,
proposes exactly these trees.
"""

from __future__ import annotations

import numpy as np
import torch

from server.speculation.draft_proposer import DraftProposer, DraftState
from server.speculation.tree import DraftTree, TreeBuilder


class HostGrowthProposer(DraftProposer):
    def launch(self, state: DraftState, levels: int | None = None) -> None:
        """Nothing starts early: each tree grows when proposed."""

    @torch.inference_mode()
    def propose(self, state: DraftState, root_token: int,
                graft: tuple[list[int], list[float]] | None = None,
                levels: int | None = None) -> DraftTree:
        builder = TreeBuilder(root_token, self.shape.top_k, self.shape.total_tokens)
        has_room = self._has_room(state)
        hidden = self._catch_up_all(state)
        if hidden is not None and has_room:
            self._grow(state, builder, hidden, self._levels(levels))
        if graft is not None:
            builder.add_chain(*graft)
        return builder.finish()

    def _catch_up_all(self, state: DraftState) -> torch.Tensor | None:
        """Every pending pair into committed slots; the last one's output [H]."""
        if not state.pending_tokens:
            return None
        features = np.concatenate(state.pending_features)
        count, start = len(state.pending_tokens), state.num_committed
        if start + count > state.cache.capacity:
            return None
        feature_tensor = torch.from_numpy(features).to(self.device, self.dtype)[None]
        tokens = torch.tensor([state.pending_tokens], device=self.device)
        positions = torch.arange(start, start + count, device=self.device)[None]
        mask = torch.ones(count, start + count, dtype=torch.bool, device=self.device)
        mask[:, start:] = torch.tril(mask[:, start:])
        hidden = self.model(feature_tensor, tokens, positions, state.cache, positions[0], mask)
        state.num_committed = start + count
        state.pending_features, state.pending_tokens = [], []
        return hidden[0, -1]

    def _grow(self, state: DraftState, builder: TreeBuilder, hidden: torch.Tensor,
              depth: int) -> None:
        committed = state.num_committed
        frontier = builder.add_children([0], *self._top(hidden[None]))
        proposer_hidden = {node: hidden for node in frontier}  # node → output that proposed it
        slot_of: dict[int, int] = {}  # expanded node → its scratch cache slot
        next_slot = committed
        for level in range(2, depth + 1):
            first_slot = next_slot
            next_slot += len(frontier)
            mask = np.zeros((len(frontier), next_slot), dtype=bool)
            mask[:, :committed] = True
            for row, node in enumerate(frontier):
                slot_of[node] = first_slot + row
                ancestor = node
                while ancestor > 0:
                    mask[row, slot_of[ancestor]] = True
                    ancestor = builder.parents[ancestor]
            slots = torch.arange(first_slot, next_slot, device=self.device)
            features = torch.stack([proposer_hidden[node] for node in frontier])[None]
            tokens = torch.tensor([[builder.tokens[node] for node in frontier]],
                                  device=self.device)
            positions = torch.tensor([[committed - 1 + level - 1] * len(frontier)],
                                     device=self.device)
            outputs = self.model(features, tokens, positions, state.cache, slots,
                                 torch.from_numpy(mask).to(self.device))[0]
            expanded = frontier
            frontier = builder.add_children(expanded, *self._top(outputs))
            by_parent = dict(zip(expanded, outputs, strict=True))
            proposer_hidden = {node: by_parent[builder.parents[node]] for node in frontier}

    def _top(self, hidden: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """hidden [P, H] → target token ids and log-probs of the top_k, each [P, k]."""
        log_probs = torch.log_softmax(self.model.head_logits(hidden).float(), dim=-1)
        top = torch.topk(log_probs, self.shape.top_k, dim=-1)
        return (self.model.head_token_ids[top.indices].cpu().numpy(),
                top.values.cpu().numpy())
