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

from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine import Engine

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "dovetail:"

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Metrics:
    """One registry per app, so several servers (or tests) in a process never collide.

    Request counts and latencies are observed here by the HTTP side; the engine's own
    numbers (speculation, decode time, queue, KV cells) are read from its counters
    (server/engine/counters.py) when /metrics is scraped."""

    def __init__(self, engine: Callable[[], Engine | None] = lambda: None) -> None:
        self.registry = registry = CollectorRegistry()
        prefix = PREFIX
        self.requests = Counter(prefix + "requests", "HTTP requests by route and status",
                                ["route", "status"], registry=registry)
        self.prompt_tokens = Counter(prefix + "prompt_tokens", "Prompt tokens processed",
                                     registry=registry)
        self.generation_tokens = Counter(prefix + "generation_tokens", "Tokens generated",
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
        registry.register(EngineCollector(engine))

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


class EngineCollector(Collector):
    """The engine's gauges and counters at scrape time (zeros while the model loads)."""

    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine()
        counters = engine.counters if engine is not None else None

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, value=value)

        yield gauge("num_requests_waiting", "Requests queued for a slot",
                    engine.num_waiting if engine else 0)
        yield gauge("num_requests_running", "Sequences being decoded",
                    engine.num_active if engine else 0)
        yield gauge("free_slots", "KV slots free for new requests",
                    engine.target.num_free_slots if engine else 0)
        yield gauge("kv_cells_used", "Target KV cache cells held by running requests",
                    counters.kv_cells_used if counters else 0)
        yield gauge("kv_cells_cached",
                    "Target KV cache cells free slots keep for prompt prefixes",
                    counters.kv_cells_cached if counters else 0)
        if counters is None:
            return
        yield counter("spec_decode_num_drafts", "Verification steps with a draft",
                      counters.drafts)
        yield counter("spec_decode_num_draft_tokens", "Drafted tokens", counters.draft_tokens)
        yield counter("spec_decode_num_accepted_tokens", "Drafted tokens accepted by the target",
                      counters.accepted_tokens)
        yield counter("spec_decode_num_forced_tokens",
                      "Accepted tokens that a grammar forced (structured output; proposed "
                      "without drafting)", counters.forced_tokens)
        per_position = CounterMetricFamily(
            PREFIX + "spec_decode_num_accepted_tokens_per_pos",
            "Steps whose N-th drafted token was accepted", labels=["position"])
        for index, count in enumerate(list(counters.accepted_per_position)):
            per_position.add_metric([str(index + 1)], count)
        yield per_position
        yield counter("spec_decode_draft_seconds", "Time spent drafting (hidden and exposed)",
                      counters.draft_seconds)
        yield counter("spec_decode_draft_hidden_seconds",
                      "Drafting ahead that ran while the target verified (off the critical "
                      "path)", counters.draft_hidden_seconds)
        yield counter("spec_decode_draft_exposed_seconds",
                      "Drafting the engine waited for",
                      counters.draft_seconds - counters.draft_hidden_seconds)
        yield counter("spec_decode_num_predrafts",
                      "Trees drafted ahead while the target verified", counters.predrafts)
        yield counter("spec_decode_num_predrafts_used",
                      "Trees drafted ahead whose guessed outcome came true",
                      counters.predrafts_used)
        yield counter("spec_decode_verify_seconds",
                      "Time spent in target decodes that verified trees "
                      "(one decode serves all running requests)", counters.verify_seconds)
        # where a first token's time goes: the target reading the prompt, then the draft
        yield counter("prompt_seconds", "Time spent in target decodes that read prompt tokens "
                      "(one decode serves all running requests)", counters.prompt_seconds)
        yield counter("spec_decode_draft_start_seconds",
                      "Time the proposer took to take in prompts before their first tokens",
                      counters.draft_start_seconds)
        by_proposer = CounterMetricFamily(
            PREFIX + "spec_decode_requests_by_proposer",
            "Requests served by each proposer, where the server chooses per request "
            "(draft: the draft model's tree with lookup merged in; lookup: prompt lookup "
            "alone)", labels=["proposer"])
        for name, count in dict(counters.requests_by_proposer).items():
            by_proposer.add_metric([name], count)
        yield by_proposer
