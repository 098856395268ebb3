"""The error table of docs/api.md against a live server: status, shape, param."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from server.errors import CatchUnexpected

CHAT = "/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]


def post(server, path, *, json=None, content=None, headers=None):
    all_headers = dict(server.headers)
    all_headers.update(headers or {})
    return httpx.post(server.v1 + path, json=json, content=content, headers=all_headers,
                      timeout=60)


def assert_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize("body,param", [
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages"),
    ({"messages": MESSAGES, "max_tokens": "ten"}, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": -5}, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": True}, "max_tokens"),
    ({"messages": MESSAGES, "temperature": 7}, "temperature"),
    ({"messages": MESSAGES, "temperature": "hot"}, "temperature"),
    ({"messages": MESSAGES, "top_p": 1.5}, "top_p"),
    ({"messages": MESSAGES, "top_k": -2}, "top_k"),
    ({"messages": MESSAGES, "min_p": -0.1}, "min_p"),
    ({"messages": MESSAGES, "presence_penalty": 3}, "presence_penalty"),
    ({"messages": MESSAGES, "frequency_penalty": -9}, "frequency_penalty"),
    ({"messages": MESSAGES, "stop": 5}, "stop"),
    ({"messages": MESSAGES, "stop": ["a"] * 17}, "stop"),
    ({"messages": MESSAGES, "n": 2}, "n"),
    ({"messages": MESSAGES, "seed": "x"}, "seed"),
    ({"messages": MESSAGES, "stream": "yes"}, "stream"),
    ({"messages": MESSAGES, "logit_bias": {"5": 500}}, "logit_bias"),
    ({"messages": MESSAGES, "logit_bias": {"not-a-token": 1}}, "logit_bias"),
    ({"messages": MESSAGES, "logit_bias": {"999999999": 1}}, "logit_bias"),
    ({"messages": MESSAGES, "stream_options": {"include_usage": "sure"}}, "stream_options"),
    ({"messages": MESSAGES, "logprobs": "yes"}, "logprobs"),
    ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
])
def test_bad_chat_fields_are_400_with_param(server, body, param):
    assert_error(post(server, CHAT, json=body), 400, param=param)


@pytest.mark.parametrize("body,param", [
    ({"prompt": 3}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 10 ** 9]}, "prompt"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": [[1], [2]]}, "prompt"),  # a batch of one prompt only
    ({}, "prompt"),
])
def test_bad_completion_fields_are_400_with_param(server, body, param):
    assert_error(post(server, "/completions", json=body), 400, param=param)


@pytest.mark.parametrize("content,content_type", [
    (b"{not json", "application/json"),
    (b"", "application/json"),
    (b"[1, 2]", "application/json"),
    (b"\"a string\"", "application/json"),
    (b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}", "application/json"),
    (b"messages=hi", "application/x-www-form-urlencoded"),
])
def test_malformed_bodies_are_400(server, content, content_type):
    response = post(server, CHAT, content=content, headers={"Content-Type": content_type})
    assert_error(response, 400)


def test_context_length_exceeded(server):
    error = assert_error(post(server, CHAT, json={"messages": MESSAGES, "max_tokens": 5000}),
                         400, code="context_length_exceeded")
    assert "2048" in error["message"]
    long_prompt = "word " * 3000
    assert_error(post(server, CHAT, json={"messages": [{"role": "user", "content": long_prompt}]}),
                 400, code="context_length_exceeded")
    assert_error(post(server, "/completions", json={"prompt": long_prompt}), 400,
                 code="context_length_exceeded")


def requests_counted(server, route, status) -> float:
    """dovetail:requests_total for a route and status, from /metrics."""
    name = f'dovetail:requests_total{{route="{route}",status="{status}"}} '
    lines = httpx.get(server.base_url + "/metrics").text.splitlines()
    return sum(float(line[len(name):]) for line in lines if line.startswith(name))


def test_api_key_is_required_on_v1_but_not_on_health(server):
    counted = {route: requests_counted(server, route, 401) for route in ("/v1/chat/completions",
                                                                         "/v1/models")}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key"}):
        response = httpx.post(server.v1 + CHAT, json={"messages": MESSAGES}, headers=headers)
        assert_error(response, 401, code="invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer"
        assert_error(httpx.get(server.v1 + "/models", headers=headers), 401)
        # checked before the body: a stranger's bad JSON is 401, not 400
        response = httpx.post(server.v1 + CHAT, content=b"{not json", headers=headers)
        assert_error(response, 401, code="invalid_api_key")
    assert httpx.get(server.base_url + "/health").status_code == 200
    # answered before routing, still counted under the route asked for
    assert requests_counted(server, "/v1/chat/completions", 401) == \
        counted["/v1/chat/completions"] + 6
    assert requests_counted(server, "/v1/models", 401) == counted["/v1/models"] + 3


def test_unknown_route_and_method(server):
    assert_error(httpx.get(server.v1 + "/nothing", headers=server.headers), 404)
    assert_error(httpx.get(server.v1 + CHAT, headers=server.headers), 405)


def test_openai_client_maps_errors(server, client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="m", messages=MESSAGES, n=3)
    assert bad.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=100000)
    assert too_long.value.code == "context_length_exceeded"
    stranger = openai.OpenAI(base_url=server.v1, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


def test_unknown_fields_are_ignored(client):
    response = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=3, temperature=0,
        extra_body={"repetition_penalty": 1.1, "vendor_thing": {"a": 1}})
    assert response.usage.completion_tokens <= 3


def test_any_integer_is_a_seed(server):
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 1.0}
    for seed in (-1, -(2**63), 2**70):
        first = post(server, CHAT, json={**body, "seed": seed})
        second = post(server, CHAT, json={**body, "seed": seed})
        assert first.status_code == second.status_code == 200
        assert first.json()["choices"][0]["message"] == second.json()["choices"][0]["message"]


@pytest.mark.parametrize("field,value,status", [
    ("max_tokens", 10**30, 400), ("max_tokens", 2**63, 400), ("top_k", 10**20, 200),
    ("temperature", 1e308, 400), ("top_p", -1e308, 400), ("seed", 10**40, 200),
])
def test_huge_numbers_are_answered_not_crashed_on(server, field, value, status):
    body = {"messages": MESSAGES, "max_tokens": 4, field: value}
    response = post(server, CHAT, json=body)
    assert response.status_code == status
    if status != 200:
        assert_error(response, status)


def test_an_oversized_body_is_413_before_it_is_read(server):
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * (9 * 2**20) + b'"}]}'
    counted = requests_counted(server, "/v1/chat/completions", 413)
    response = post(server, CHAT, content=big, headers={"Content-Type": "application/json"})
    assert "request body is over" in assert_error(response, 413)["message"]
    assert requests_counted(server, "/v1/chat/completions", 413) == counted + 1
    assert post(server, CHAT, json={"messages": MESSAGES, "max_tokens": 2}).status_code == 200


def test_a_chunked_oversized_body_is_413_too(server):
    """No Content-Length to refuse up front: the limit is met while the body is read."""
    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(9):
            yield b"a" * 2**20
        yield b'"}]}'

    response = post(server, CHAT, content=chunks(), headers={"Content-Type": "application/json"})
    assert "request body is over" in assert_error(response, 413)["message"]


SURROGATE = "\\ud800"  # as JSON writes it: a lone UTF-16 surrogate, no UTF-8 form


@pytest.mark.parametrize("path,body,param", [
    (CHAT, f'{{"messages": [{{"role": "user", "content": "a{SURROGATE}b"}}]}}', "messages"),
    (CHAT, f'{{"messages": [{{"role": "user", "content": [{{"type": "text", '
           f'"text": "{SURROGATE}"}}]}}]}}', "messages"),
    (CHAT, f'{{"messages": [{{"role": "user", "content": "hi", "name": "{SURROGATE}"}}]}}',
     "messages"),
    (CHAT, f'{{"messages": [{{"role": "user", "content": "hi"}}], "stop": ["{SURROGATE}"]}}',
     "stop"),
    (CHAT, f'{{"messages": [{{"role": "user", "content": "hi"}}], '
           f'"logit_bias": {{"{SURROGATE}": 1}}}}', "logit_bias"),
    ("/completions", f'{{"prompt": "x{SURROGATE}"}}', "prompt"),
    ("/completions", f'{{"prompt": ["{SURROGATE}"], "echo": true, "stream": true}}', "prompt"),
])
def test_text_that_is_not_unicode_is_400_and_the_connection_stays_open(server, path, body,
                                                                        param):
    with httpx.Client(headers={**server.headers, "Content-Type": "application/json"},
                      timeout=60) as http:
        assert_error(http.post(server.v1 + path, content=body.encode()), 400, param=param)
        again = http.post(server.v1 + CHAT, json={"messages": MESSAGES, "max_tokens": 2})
        assert again.status_code == 200


@pytest.mark.parametrize("key", [" 10 ", "1_0", "\u0663", "+5", "-1"])
def test_logit_bias_keys_are_plain_token_ids(server, key):
    body = {"messages": MESSAGES, "max_tokens": 2, "logit_bias": {key: 1}}
    assert_error(post(server, CHAT, json=body), 400, param="logit_bias")


def test_null_is_a_field_left_out(server):
    nulls = dict.fromkeys(["model", "max_tokens", "temperature", "top_p", "top_k", "min_p",
                           "presence_penalty", "frequency_penalty", "logit_bias", "seed",
                           "stop", "n", "stream", "stream_options", "logprobs", "top_logprobs",
                           "user"])
    body = {"messages": MESSAGES, **nulls, "max_completion_tokens": 2}
    assert post(server, CHAT, json=body).status_code == 200
    body = {"prompt": "Hi", **nulls, "echo": None, "suffix": None, "best_of": None}
    assert post(server, "/completions", json=body).status_code == 200
    assert_error(post(server, CHAT, json={"messages": None}), 400, param="messages")


def test_the_served_model_can_be_retrieved(server, client):
    name = client.models.list().data[0].id
    assert client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.code == "model_not_found"


def test_an_unexpected_exception_is_a_500_in_openai_shape_and_not_raised_on():
    """Starlette's own 500 handler raises the exception again after answering, and uvicorn
    then closes the connection under the client's next request."""
    async def failing(scope, receive, send):
        raise RuntimeError("boom")

    async def failing_late(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("boom")

    async def call(app):
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        await CatchUnexpected(app)({"type": "http", "path": "/x", "method": "GET",
                                    "headers": []}, receive, send)
        return sent

    sent = asyncio.run(call(failing))
    assert sent[0]["status"] == 500
    body = b"".join(message.get("body", b"") for message in sent[1:])
    assert httpx.Response(500, content=body).json()["error"]["type"] == "server_error"
    assert [m["type"] for m in asyncio.run(call(failing_late))] == ["http.response.start"]
