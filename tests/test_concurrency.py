"""Many clients at once on a live server: batched decoding keeps results, limits hold, and
shutdown ends every stream properly. Loopback only; every wait is bounded."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import start_server, stop_server

CLIENTS = 16
ROUNDS = 3
TOPICS = ["the sea", "a robot", "autumn", "a city at night", "bread", "the moon", "a cat",
          "trains", "rain", "chess", "a lighthouse", "coffee", "winter", "a library", "bees",
          "mountains"]


def question(index: int) -> str:
    return f"Write two sentences about {TOPICS[index % len(TOPICS)]}."


def stream_chat(server, text: str, max_tokens: int, extra: dict | None = None,
                timeout: float = 120) -> dict:
    """One streamed chat request, checked chunk by chunk; returns its parts."""
    body = {"model": "m", "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    pieces, finish, usage, speculative, error, done = [], None, None, None, None, False
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body,
                      headers=server.headers, timeout=timeout) as response:
        if response.status_code != 200:
            response.read()
            return {"status": response.status_code, "body": response.json()}
        for line in response.iter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            assert not done, "data after [DONE]"
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                error = chunk["error"]
                continue
            assert chunk["object"] == "chat.completion.chunk"
            if not chunk["choices"]:
                usage, speculative = chunk["usage"], chunk["speculative"]
                continue
            choice = chunk["choices"][0]
            assert finish is None, "a chunk after the finish chunk"
            if not pieces and choice["finish_reason"] is None:
                assert choice["delta"]["role"] == "assistant"
            pieces.append(choice["delta"].get("content", ""))
            finish = choice["finish_reason"]
    assert done, "the stream did not end with [DONE]"
    return {"status": 200, "text": "".join(pieces), "finish": finish, "usage": usage,
            "speculative": speculative, "error": error}


@pytest.fixture(scope="module")
def f16_server(f16_model, tmp_path_factory):
    live = start_server("--model", str(f16_model), "--draft", "none", "--max-concurrency", "8",
                        "--ctx-size", "512",
                        log_path=tmp_path_factory.mktemp("logs") / "server.log")
    yield live
    stop_server(live)


def test_sixteen_concurrent_streams_equal_each_request_served_alone(f16_server):
    """F16 target at T=0: decoding up to eight requests per llama.cpp batch (and reading
    new prompts in the same decodes) gives each request its solo output exactly: each
    request attends over cells of its own, in its own order (docs/how-it-works.md)."""
    alone = [stream_chat(f16_server, question(i), 32) for i in range(CLIENTS)]
    assert all(reply["status"] == 200 and reply["error"] is None for reply in alone)
    assert len({reply["text"] for reply in alone}) == CLIENTS  # distinct answers
    peak, polling = [0], threading.Event()

    def poll_active():  # shows that requests really were decoded side by side
        while not polling.wait(0.05):
            active = httpx.get(f16_server.base_url + "/health").json()["active_requests"]
            peak[0] = max(peak[0], active)

    poller = threading.Thread(target=poll_active)
    poller.start()
    with ThreadPoolExecutor(CLIENTS) as pool:
        for round_index in range(ROUNDS):
            order = [(i + round_index * 5) % CLIENTS for i in range(CLIENTS)]
            replies = list(pool.map(lambda i: stream_chat(f16_server, question(i), 32), order))
            for index, reply in zip(order, replies, strict=True):
                assert reply["status"] == 200 and reply["error"] is None
                assert reply["text"] == alone[index]["text"]
                assert reply["finish"] == alone[index]["finish"]
                assert reply["usage"] == alone[index]["usage"]
    polling.set()
    poller.join()
    assert peak[0] >= 4
    health = httpx.get(f16_server.base_url + "/health").json()
    assert health["active_requests"] == 0 and health["free_slots"] == 8


def never_end(server) -> dict:
    """logit_bias forbidding the default model's end tokens (<|endoftext|>, <|im_end|>...)."""
    return {"logit_bias": {"0": -100, "2": -100, "4": -100}}


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    live = start_server("--draft", "none", "--max-concurrency", "1", "--ctx-size", "4096",
                        "--request-timeout", "2", "--shutdown-grace", "2",
                        log_path=tmp_path_factory.mktemp("logs") / "server.log")
    yield live
    stop_server(live)


def test_request_timeout_ends_a_running_request_with_what_it_has(strict_server):
    server = strict_server
    started = time.monotonic()
    ended = stream_chat(server, "Count to a thousand.", 3000, never_end(server))
    assert time.monotonic() - started < 10
    assert ended["status"] == 200 and ended["error"] is None
    assert ended["finish"] == "length"
    assert 0 < ended["usage"]["completion_tokens"] < 3000
    body = {"model": "m", "messages": [{"role": "user", "content": "Count to a thousand."}],
            "max_tokens": 3000, **never_end(server)}
    reply = httpx.post(server.v1 + "/chat/completions", json=body, headers=server.headers,
                       timeout=30).json()
    assert reply["choices"][0]["finish_reason"] == "length"
    assert 0 < reply["usage"]["completion_tokens"] < 3000
    health = httpx.get(server.base_url + "/health").json()
    assert health["active_requests"] == 0 and health["free_slots"] == 1


def test_shutdown_ends_running_streams_properly_and_refuses_the_rest(tmp_path):
    server = start_server("--draft", "none", "--max-concurrency", "1", "--ctx-size", "4096",
                          "--shutdown-grace", "2", log_path=tmp_path / "server.log")
    try:
        started = threading.Event()

        def long_stream():
            body = {"model": "m", "messages": [{"role": "user", "content": "Count on."}],
                    "max_tokens": 3000, "temperature": 0, "stream": True, **never_end(server)}
            lines = []
            with httpx.stream("POST", server.v1 + "/chat/completions", json=body,
                              headers=server.headers, timeout=60) as response:
                for line in response.iter_lines():
                    lines.append(line)
                    if len(lines) == 6:
                        started.set()
            return [line for line in lines if line]

        with ThreadPoolExecutor(3) as pool:
            running = pool.submit(long_stream)
            assert started.wait(30)
            queued = pool.submit(stream_chat, server, "Hello", 5)
            body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 5}
            queued_plain = pool.submit(httpx.post, server.v1 + "/chat/completions", json=body,
                                       headers=server.headers, timeout=30)
            time.sleep(0.5)
            server.process.send_signal(signal.SIGTERM)
            lines, refused = running.result(timeout=30), queued.result(timeout=30)
            refused_plain = queued_plain.result(timeout=30)
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] == "length"
        assert refused["status"] == 200 and refused["error"]["type"] == \
            "service_unavailable_error" and refused["text"] == ""
        assert refused_plain.status_code == 503 and refused_plain.headers["retry-after"]
        assert refused_plain.json()["error"]["type"] == "service_unavailable_error"
        server.process.wait(timeout=30)  # exits within the grace, not at the 3000th token
    finally:
        if server.process.poll() is None:
            stop_server(server)
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log


@pytest.mark.parametrize("model", ["q4_1", "f16"])
def test_prompt_lookup_served_concurrently_equals_plain_decoding(model, request, tmp_path):
    """`--draft ngram` (forced to draft every step it finds a match) with eight clients at
    once: each output equals plain decoding of the same request alone, on the Q4_1 default
    and its F16 copy, token for token; /health says so."""
    plain_server = request.getfixturevalue("server" if model == "q4_1" else "f16_server")
    texts = [f"Repeat exactly, twice: {TOPICS[i]}, {TOPICS[i + 1]}, {TOPICS[i + 2]}."
             for i in range(8)]
    plain = [stream_chat(plain_server, text, 40) for text in texts]
    model_args = [] if model == "q4_1" else ["--model", str(request.getfixturevalue("f16_model"))]
    lookup = start_server(*model_args, "--draft", "ngram", "--no-adaptive-budget",
                          "--max-concurrency", "8", "--ctx-size", "512",
                          log_path=tmp_path / "server.log")
    try:
        health = httpx.get(lookup.base_url + "/health").json()
        with ThreadPoolExecutor(len(texts)) as pool:
            replies = list(pool.map(lambda text: stream_chat(lookup, text, 40), texts))
    finally:
        stop_server(lookup)
    assert health["identical_to_plain"] and health["kernels"] == "exact"
    for reply, reference in zip(replies, plain, strict=True):
        assert reply["status"] == 200 and reply["error"] is None
        assert reply["text"] == reference["text"]
    assert sum(reply["speculative"]["accepted_tokens"] for reply in replies) > 0
