"""Prometheus metrics (`GET /metrics`), named like vLLM's and llama.cpp's.

Speculation counters follow the peers' `spec_decode_*` names with a `dovetail:` prefix:
  drafts            verification steps that verified at least one drafted token
  draft_tokens      drafted tokens sent to the target
  accepted_tokens   drafted tokens the target accepted (its own bonus token not counted)
  accepted_tokens_per_pos{position="N"}  steps whose N-th drafted token (1-based) was accepted
Derived: acceptance rate = accepted_tokens / draft_tokens; mean accepted length
τ = 1 + accepted_tokens / drafts (tokens per verification step, bonus included).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Metrics:
    """One registry per app, so several servers (or tests) in a process never collide."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        prefix = "dovetail:"
        self.requests = Counter(prefix + "requests", "HTTP requests by route and status",
                                ["route", "status"], registry=registry)
        self.prompt_tokens = Counter(prefix + "prompt_tokens", "Prompt tokens processed",
                                     registry=registry)
        self.generation_tokens = Counter(prefix + "generation_tokens", "Tokens generated",
                                         registry=registry)
        self.waiting = Gauge(prefix + "num_requests_waiting", "Requests queued for a slot",
                             registry=registry)
        self.running = Gauge(prefix + "num_requests_running", "Sequences being decoded",
                             registry=registry)
        self.free_slots = Gauge(prefix + "free_slots", "KV slots free for new requests",
                                registry=registry)
        self.kv_cells_used = Gauge(prefix + "kv_cells_used",
                                   "Target KV cache cells held by running requests",
                                   registry=registry)
        self.kv_cells_cached = Gauge(prefix + "kv_cells_cached",
                                     "Target KV cache cells free slots keep for prompt prefixes",
                                     registry=registry)
        self.time_to_first_token = Histogram(
            prefix + "time_to_first_token_seconds", "Request arrival to first token",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.time_per_output_token = Histogram(
            prefix + "time_per_output_token_seconds", "Mean time per token after the first",
            buckets=TOKEN_BUCKETS, registry=registry)
        self.request_latency = Histogram(
            prefix + "e2e_request_latency_seconds", "Request arrival to its last token",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.drafts = Counter(prefix + "spec_decode_num_drafts", "Verification steps with a draft",
                              registry=registry)
        self.draft_tokens = Counter(prefix + "spec_decode_num_draft_tokens", "Drafted tokens",
                                    registry=registry)
        self.accepted_tokens = Counter(prefix + "spec_decode_num_accepted_tokens",
                                       "Drafted tokens accepted by the target", registry=registry)
        self.accepted_per_position = Counter(
            prefix + "spec_decode_num_accepted_tokens_per_pos",
            "Steps whose N-th drafted token was accepted", ["position"], registry=registry)
        self.draft_seconds = Counter(prefix + "spec_decode_draft_seconds",
                                     "Time spent drafting", registry=registry)
        self.verify_seconds = Counter(prefix + "spec_decode_verify_seconds",
                                      "Time spent in target decodes that verified trees "
                                      "(one decode serves all running requests)",
                                      registry=registry)
        # where a first token's time goes: the target reading the prompt, then the draft
        self.prompt_seconds = Counter(prefix + "prompt_seconds",
                                      "Time spent in target decodes that read prompt tokens "
                                      "(one decode serves all running requests)",
                                      registry=registry)
        self.draft_start_seconds = Counter(prefix + "spec_decode_draft_start_seconds",
                                           "Time the proposer took to take in prompts "
                                           "before their first tokens", registry=registry)
        self.proposer_requests = Counter(
            prefix + "spec_decode_requests_by_proposer",
            "Requests served by each proposer, where the server chooses per request "
            "(draft: the draft model's tree with lookup merged in; lookup: prompt lookup "
            "alone)", ["proposer"], registry=registry)

    def observe_prompt(self, seconds: float) -> None:
        """One target decode that read prompt tokens (it may have verified trees too)."""
        self.prompt_seconds.inc(seconds)

    def observe_draft_start(self, seconds: float) -> None:
        """The proposer took in a prompt (a draft model: its features) before that
        request's first token."""
        self.draft_start_seconds.inc(seconds)

    def observe_proposer(self, name: str) -> None:
        """A request was given to a proposer (server/proposer_choice.py)."""
        self.proposer_requests.labels(proposer=name).inc()

    def observe_verify(self, seconds: float) -> None:
        """One target decode that verified the trees of all decoding sequences."""
        self.verify_seconds.inc(seconds)

    def observe_step(self, num_drafted: int, num_accepted: int, draft_seconds: float) -> None:
        """One verification step of one sequence (called on the engine thread). Its drafting
        time counts even when the budget then verified no drafted token."""
        self.draft_seconds.inc(draft_seconds)
        if not num_drafted:
            return
        self.drafts.inc()
        self.draft_tokens.inc(num_drafted)
        self.accepted_tokens.inc(num_accepted)
        for position in range(1, num_accepted + 1):
            self.accepted_per_position.labels(position=str(position)).inc()

    def observe_request(self, prompt_tokens: int, completion_tokens: int,
                        first_token_seconds: float | None, total_seconds: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.request_latency.observe(total_seconds)
        if first_token_seconds is not None:
            self.time_to_first_token.observe(first_token_seconds)
            if completion_tokens > 1:
                self.time_per_output_token.observe(
                    (total_seconds - first_token_seconds) / (completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
