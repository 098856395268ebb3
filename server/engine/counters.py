"""What the engine counts as it runs: written on the engine thread, read by /metrics
(server/metrics.py) when scraped. Plain numbers, so that the engine needs no metrics
library and a test can read them directly."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineCounters:
    drafts: int = 0  # verification steps of one sequence that verified a drafted token
    draft_tokens: int = 0  # drafted tokens sent to the target
    accepted_tokens: int = 0  # drafted tokens the target accepted (bonus tokens not counted)
    forced_tokens: int = 0  # of those, tokens a grammar forced (proposed without drafting)
    # [i]: steps whose (i+1)-th drafted token was accepted
    accepted_per_position: list[int] = field(default_factory=list)
    draft_seconds: float = 0.0  # drafting, counted also where the budget then verified none
    # of which: drafting ahead that ran while the target verified (the rest was exposed)
    draft_hidden_seconds: float = 0.0
    predrafts: int = 0  # trees drafted ahead during a verification
    predrafts_used: int = 0  # of those, trees whose guessed outcome came true (then verified)
    verify_seconds: float = 0.0  # target decodes that verified trees (one serves all)
    prompt_seconds: float = 0.0  # target decodes that read prompt tokens
    draft_start_seconds: float = 0.0  # proposers taking in prompts before first tokens
    requests_by_proposer: dict[str, int] = field(default_factory=dict)  # per-request choice
    kv_cells_used: int = 0  # target KV cells held by running requests
    kv_cells_cached: int = 0  # cells free slots keep for prompt prefixes

    def add_step(self, num_drafted: int, num_accepted: int, draft_seconds: float) -> None:
        """One verification step of one sequence."""
        self.draft_seconds += draft_seconds
        if not num_drafted:
            return
        self.drafts += 1
        self.draft_tokens += num_drafted
        self.accepted_tokens += num_accepted
        positions = self.accepted_per_position
        while len(positions) < num_accepted:
            positions.append(0)
        for index in range(num_accepted):
            positions[index] += 1

    def add_ahead(self, report) -> None:
        """One step's trees drafted ahead (an AheadReport): their runs' time inside the
        verification was hidden; the exposed rest is counted with the next tree's drafting
        time (add_step)."""
        self.draft_seconds += report.hidden
        self.draft_hidden_seconds += report.hidden
        self.predrafts += report.trees
        self.predrafts_used += report.used

    def add_request(self, proposer: str) -> None:
        """A request was given to a proposer (server/speculation/choice.py)."""
        self.requests_by_proposer[proposer] = self.requests_by_proposer.get(proposer, 0) + 1
