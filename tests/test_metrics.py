"""/metrics, back-pressure and the per-request log line, on a live server with the
shipped draft (so the speculation counters move)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.conftest import start_server, stop_server


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("logs") / "server.log"
    # drafting every step: on a CPU the adaptive budget would soon stop the shipped draft
    live = start_server("--draft", "shipped", "--draft-device", "cpu", "--draft-tokens", "8",
                        "--draft-top-k", "4", "--draft-depth", "4", "--max-concurrency", "1",
                        "--max-queue", "1", "--ctx-size", "1024", "--no-adaptive-budget",
                        log_path=log_path)
    yield live, log_path
    stop_server(live)


def scrape(server) -> dict[str, float]:
    response = httpx.get(server.base_url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    values = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def chat(server, text, max_tokens, stream=False, timeout=300):
    body = {"model": "m", "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    return httpx.post(server.v1 + "/chat/completions", json=body, headers=server.headers,
                      timeout=timeout)


def test_metrics_count_tokens_requests_and_speculation(busy_server):
    server, log_path = busy_server
    before = scrape(server)
    assert before["dovetail:spec_decode_num_drafts_total"] == 0
    reply = chat(server, "Write a Python function that adds two numbers.", 32).json()
    usage, speculative = reply["usage"], reply["speculative"]
    after = scrape(server)

    def grew(name):
        return after.get(name, 0) - before.get(name, 0)

    assert grew("dovetail:prompt_tokens_total") == usage["prompt_tokens"]
    assert grew("dovetail:generation_tokens_total") == usage["completion_tokens"]
    assert grew("dovetail:spec_decode_num_drafts_total") == speculative["verify_steps"] - 1
    assert grew("dovetail:spec_decode_num_draft_tokens_total") == speculative["drafted_tokens"]
    accepted = grew("dovetail:spec_decode_num_accepted_tokens_total")
    assert accepted == speculative["accepted_tokens"] > 0
    per_position = {name: value for name, value in after.items()
                    if name.startswith("dovetail:spec_decode_num_accepted_tokens_per_pos_total")}
    assert sum(per_position.values()) == accepted
    first = per_position['dovetail:spec_decode_num_accepted_tokens_per_pos_total{position="1"}']
    assert all(value <= first for value in per_position.values())
    assert grew("dovetail:spec_decode_draft_seconds_total") > 0
    assert grew("dovetail:spec_decode_verify_seconds_total") > 0
    assert grew("dovetail:prompt_seconds_total") > 0
    assert grew("dovetail:spec_decode_draft_start_seconds_total") > 0
    assert grew("dovetail:time_to_first_token_seconds_count") == 1
    assert grew("dovetail:e2e_request_latency_seconds_count") == 1
    assert grew('dovetail:requests_total{route="/v1/chat/completions",status="200"}') == 1
    assert after["dovetail:num_requests_running"] == 0

    lines = [json.loads(line[line.index("{"):]) for line in log_path.read_text().splitlines()
             if '"request_id"' in line]  # "<time> INFO dovetail.server: {...}"
    assert any(line["request_id"] == reply["id"] and line["status"] == "length"
               and line["completion_tokens"] == usage["completion_tokens"]
               and line["prompt_tokens"] == usage["prompt_tokens"]
               and line["tau"] > 1.0 and line["latency_s"] > 0 for line in lines)


def test_a_full_queue_answers_429_with_retry_after(busy_server):
    server, _ = busy_server
    first_chunk = threading.Event()
    results = {}

    def long_stream(name):
        body = {"model": "m", "messages": [{"role": "user", "content": "Count to one hundred."}],
                "max_tokens": 120, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.v1 + "/chat/completions", json=body,
                          headers=server.headers, timeout=300) as response:
            results[name] = response.status_code
            for _ in response.iter_lines():
                first_chunk.set()

    active = threading.Thread(target=long_stream, args=("active",))
    active.start()
    assert first_chunk.wait(120)
    waiting = threading.Thread(target=long_stream, args=("waiting",))
    waiting.start()
    deadline = time.monotonic() + 60
    while httpx.get(server.base_url + "/health").json()["waiting_requests"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    refused = chat(server, "hello", 4)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "server_busy" and error["type"] == "rate_limit_exceeded"
    assert scrape(server)["dovetail:num_requests_waiting"] == 1
    active.join(300)
    waiting.join(300)
    assert results == {"active": 200, "waiting": 200}
    assert chat(server, "hello", 4).status_code == 200  # room again
    assert scrape(server)['dovetail:requests_total{route="/v1/chat/completions",status="429"}'] \
        >= 1


@pytest.fixture(scope="module")
def plain_server():
    live = start_server("--draft", "none", "--max-concurrency", "2", "--max-queue", "200",
                        "--ctx-size", "1024")
    yield live
    stop_server(live)


def test_a_hundred_clients_that_leave_mid_request_leave_nothing_behind(plain_server):
    server = plain_server
    question = "Describe the water cycle in detail."
    before = chat(server, question, 24).json()["choices"][0]["message"]["content"]
    assert scrape(server)["dovetail:kv_cells_used"] == 0
    body = {"model": "m", "messages": [{"role": "user", "content": question}],
            "max_tokens": 400, "stream": True}
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body,
                      headers=server.headers, timeout=300) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
        during = scrape(server)  # the gauges see a live request
        assert during["dovetail:kv_cells_used"] > 0 and during["dovetail:free_slots"] == 1

    def leave_mid_stream(index):
        body = {"model": "m", "messages": [{"role": "user", "content": f"Story {index}:"}],
                "max_tokens": 400, "temperature": 0.8, "seed": index, "stream": True}
        with httpx.stream("POST", server.v1 + "/chat/completions", json=body,
                          headers=server.headers, timeout=300) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for _ in range(3 + index % 4):  # role chunk, then a few tokens (or still queued)
                next(lines)

    def leave_while_waiting(index):
        with pytest.raises(httpx.ReadTimeout):
            chat(server, f"Essay {index}:", 400, timeout=0.3 + 0.1 * (index % 3))

    workers = [threading.Thread(target=leave_mid_stream if i % 5 else leave_while_waiting,
                                args=(i,)) for i in range(100)]
    for start in range(0, 100, 10):  # ten at a time: more than the slots and than the queue
        batch = workers[start:start + 10]
        for worker in batch:
            worker.start()
        for worker in batch:
            worker.join(300)
    deadline = time.monotonic() + 60
    while True:
        values = scrape(server)
        idle = values["dovetail:num_requests_running"] == 0 \
            and values["dovetail:num_requests_waiting"] == 0
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert idle
    assert values["dovetail:free_slots"] == 2
    assert values["dovetail:kv_cells_used"] == 0
    assert httpx.get(server.base_url + "/health").json()["free_slots"] == 2
    after = chat(server, question, 24).json()["choices"][0]["message"]["content"]
    assert after == before


def test_drafting_time_counts_also_when_nothing_drafted_was_verified():
    """The adaptive budget may draft and then verify the root alone: that time was spent.
    The engine's counters reach /metrics through the collector at scrape time."""
    from types import SimpleNamespace

    from server.engine.counters import EngineCounters
    from server.metrics import Metrics

    counters = EngineCounters()
    engine = SimpleNamespace(counters=counters, num_waiting=3, num_active=1,
                             target=SimpleNamespace(num_free_slots=2))
    metrics = Metrics(lambda: engine)
    counters.add_step(num_drafted=0, num_accepted=0, draft_seconds=0.25)
    counters.add_step(num_drafted=3, num_accepted=2, draft_seconds=0.5)
    counters.add_request("lookup")
    counters.draft_seconds += 0.25  # a tree drafted ahead, inside a verification
    counters.draft_hidden_seconds += 0.25
    counters.predrafts, counters.predrafts_used = 4, 1
    registry = metrics.registry
    assert registry.get_sample_value("dovetail:spec_decode_draft_seconds_total") == 1.0
    assert registry.get_sample_value("dovetail:spec_decode_draft_hidden_seconds_total") == 0.25
    assert registry.get_sample_value("dovetail:spec_decode_draft_exposed_seconds_total") == 0.75
    assert registry.get_sample_value("dovetail:spec_decode_num_predrafts_total") == 4
    assert registry.get_sample_value("dovetail:spec_decode_num_predrafts_used_total") == 1
    assert registry.get_sample_value("dovetail:spec_decode_num_drafts_total") == 1
    assert registry.get_sample_value("dovetail:spec_decode_num_draft_tokens_total") == 3
    assert registry.get_sample_value("dovetail:spec_decode_num_accepted_tokens_total") == 2
    per_position = "dovetail:spec_decode_num_accepted_tokens_per_pos_total"
    assert registry.get_sample_value(per_position, {"position": "2"}) == 1
    assert registry.get_sample_value(per_position, {"position": "3"}) is None
    assert registry.get_sample_value("dovetail:spec_decode_requests_by_proposer_total",
                                     {"proposer": "lookup"}) == 1
    assert registry.get_sample_value("dovetail:num_requests_waiting") == 3
    assert registry.get_sample_value("dovetail:free_slots") == 2
    assert Metrics().registry.get_sample_value("dovetail:free_slots") == 0  # still loading
