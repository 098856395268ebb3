"""Structured outputs and tool calls through the real `openai` client against live servers,
one with prompt lookup and one with the shipped draft (with lookup): every reply to ten
schemas validates (streamed and not), `json_object` replies parse, a two-tool conversation
goes call → tool result → answer, and bad schemas and tools get 400s in OpenAI's shape."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import pytest

from tests.conftest import start_server, stop_server

CASES = json.loads((Path(__file__).resolve().parent.parent / "scripts" / "data"
                    / "extraction_prompts.json").read_text())[:10]
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                                 "maxLength": 40}},
                       "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The local time in a time zone",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string",
                                                                     "maxLength": 40}},
                       "required": ["timezone"], "additionalProperties": False}}},
]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


@pytest.fixture(scope="module", params=["lookup", "draft"])
def live(request, tmp_path_factory):
    draft = "ngram" if request.param == "lookup" else "shipped"
    server = start_server("--ctx-size", "2048", "--max-concurrency", "2", "--draft", draft,
                          log_path=tmp_path_factory.mktemp("logs") / "server.log")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def openai_client(live):
    import openai

    return openai.OpenAI(base_url=live.v1, api_key=live.api_key, max_retries=0, timeout=300)


def schema_format(case: dict) -> dict:
    return {"type": "json_schema",
            "json_schema": {"name": case["name"], "schema": case["schema"], "strict": True}}


def ask(client, content: str, stream: bool, **fields) -> tuple[str, dict, str]:
    """The reply's text, its speculative counts and its finish reason."""
    messages = [{"role": "user", "content": content}]
    if not stream:
        reply = client.chat.completions.create(model="m", messages=messages, temperature=0,
                                               max_tokens=300, **fields)
        return (reply.choices[0].message.content, reply.model_extra["speculative"],
                reply.choices[0].finish_reason)
    pieces, speculative, finish = [], {}, None
    for chunk in client.chat.completions.create(
            model="m", messages=messages, temperature=0, max_tokens=300, stream=True,
            stream_options={"include_usage": True}, **fields):
        speculative = (chunk.model_extra or {}).get("speculative") or speculative
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(pieces), speculative, finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_every_reply_validates_under_its_schema(openai_client, stream):
    forced = 0
    for case in CASES:
        text, speculative, finish = ask(openai_client, case["prompt"], stream,
                                        response_format=schema_format(case))
        assert finish == "stop", (case["name"], text)
        jsonschema.validate(json.loads(text), case["schema"])
        forced += speculative["forced_tokens"]
        assert speculative["forced_tokens"] <= speculative["accepted_tokens"]
    assert forced > 0


def test_streamed_and_whole_replies_are_the_same_text(openai_client):
    for case in CASES[:3]:
        fmt = schema_format(case)
        assert ask(openai_client, case["prompt"], True, response_format=fmt)[0] == \
            ask(openai_client, case["prompt"], False, response_format=fmt)[0]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_object_replies_parse(openai_client, stream):
    for prompt in ("Describe a cat as a JSON object.", "List three colours in JSON."):
        text, _, finish = ask(openai_client, prompt, stream,
                              response_format={"type": "json_object"})
        if finish == "stop":
            assert isinstance(json.loads(text), dict)
        else:  # cut at max_tokens: still a JSON object's beginning
            assert text.startswith("{")


def call_tools(client, messages: list, stream: bool, **fields):
    """One turn: (content, [(id, name, arguments)], finish_reason), read through the
    client's own types."""
    request = dict(model="m", messages=messages, tools=TOOLS, temperature=0, max_tokens=120,
                   parallel_tool_calls=False, **fields)
    if not stream:
        choice = client.chat.completions.create(**request).choices[0]
        calls = [(c.id, c.function.name, c.function.arguments)
                 for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, ["", "", ""])
                if delta.id:
                    call[0], call[1] = delta.id, delta.function.name
                call[2] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return content or None, [tuple(call) for call in calls.values()], finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_two_tool_conversation_goes_call_then_result_then_answer(openai_client, stream):
    messages = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    content, calls, finish = call_tools(openai_client, messages, stream,
                                        tool_choice="required")
    assert finish == "tool_calls" and content is None and len(calls) == 1
    call_id, name, arguments = calls[0]
    assert call_id.startswith("call_") and name in PARAMETERS
    jsonschema.validate(json.loads(arguments), PARAMETERS[name])
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": '{"temperature_c": 18}'}]
    content, calls, finish = call_tools(openai_client, messages, stream, tool_choice="none")
    assert calls == [] and finish in ("stop", "length") and content
    # a named function: exactly that one
    content, calls, finish = call_tools(openai_client, messages[:1], stream, tool_choice={
        "type": "function", "function": {"name": "get_time"}})
    assert finish == "tool_calls" and [call[1] for call in calls] == ["get_time"]
    jsonschema.validate(json.loads(calls[0][2]), PARAMETERS["get_time"])


def test_tool_calls_streamed_equal_tool_calls_whole(openai_client):
    messages = [{"role": "user", "content": "What time is it in Tokyo?"}]
    whole = call_tools(openai_client, messages, False, tool_choice="required")
    streamed = call_tools(openai_client, messages, True, tool_choice="required")
    assert [call[1:] for call in whole[1]] == [call[1:] for call in streamed[1]]


def test_completions_take_a_response_format_too(live):
    reply = httpx.post(live.v1 + "/completions", headers=live.headers, timeout=120, json={
        "model": "m", "prompt": "A person as JSON:", "max_tokens": 120, "temperature": 0,
        "response_format": schema_format(CASES[0])}).json()
    jsonschema.validate(json.loads(reply["choices"][0]["text"]), CASES[0]["schema"])


def chat(**fields) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            **fields}


def schema(value) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": value}}


def function(name="f", parameters=None) -> dict:
    body = {"name": name}
    if parameters is not None:
        body["parameters"] = parameters
    return {"type": "function", "function": body}


BAD = [
    (chat(response_format=schema({"type": "strin"})), "response_format", "strin"),
    (chat(response_format=schema({"type": "string", "minLength": 3, "maxLength": 1})),
     "response_format", "minLength"),
    (chat(response_format=schema({"$ref": "#/$defs/nowhere"})), "response_format", "nowhere"),
    (chat(response_format=schema({"type": "string", "pattern": "(unclosed"})),
     "response_format", "regex"),
    (chat(response_format=schema([1, 2])), "response_format", None),
    (chat(response_format={"type": "json_schema"}), "response_format", "json_schema"),
    (chat(response_format={"type": "xml"}), "response_format", None),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "has space",
                                                                  "schema": {}}}),
     "response_format", None),
    (chat(tools=[function(parameters={"type": "objekt"})]), "tools", "objekt"),
    (chat(tools=[function("bad name!")]), "tools", None),
    (chat(tools=[function(), function()]), "tools", "twice"),
    (chat(tools=[{"type": "retrieval"}]), "tools", None),
    (chat(tools=[]), "tools", None),
    (chat(tools=[function()], tool_choice={"type": "function", "function": {"name": "g"}}),
     "tool_choice", "'g'"),
    (chat(tool_choice="required"), "tool_choice", "no tools"),
    (chat(tools=[function()], tool_choice="sometimes"), "tool_choice", None),
    ({"model": "m", "max_tokens": 4, "messages": [
        {"role": "tool", "content": "18 C"}]}, "messages", "tool_call_id"),
    ({"model": "m", "max_tokens": 4, "messages": [
        {"role": "assistant", "content": None}]}, "messages", "content"),
    ({"model": "m", "max_tokens": 4, "messages": [
        {"role": "user", "content": "hi", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages", "assistant"),
]


@pytest.mark.parametrize(("body", "param", "says"), BAD,
                         ids=[f"{i}-{param}" for i, (_, param, _) in enumerate(BAD)])
def test_bad_schemas_and_tools_get_a_400_naming_the_field(live, body, param, says):
    response = httpx.post(live.v1 + "/chat/completions", headers=live.headers, json=body,
                          timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param)
    if says is not None:
        assert says in error["message"]


def test_the_server_still_serves_after_the_bad_requests(openai_client):
    text, _, _ = ask(openai_client, CASES[0]["prompt"], False,
                     response_format=schema_format(CASES[0]))
    jsonschema.validate(json.loads(text), CASES[0]["schema"])


def test_forced_tokens_are_counted_in_metrics(live):
    text = httpx.get(live.base_url + "/metrics").text
    line = next(line for line in text.splitlines()
                if line.startswith("dovetail:spec_decode_num_forced_tokens_total"))
    assert float(line.split()[-1]) > 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_with_auto_the_reply_is_an_answer_or_calls_never_call_text(openai_client, stream):
    for prompt in ("Hello! Who are you?", "What is the weather in Rome?"):
        content, calls, finish = call_tools(openai_client, [{"role": "user",
                                                             "content": prompt}], stream)
        if calls:
            assert finish == "tool_calls" and content is None
            for _, name, arguments in calls:
                jsonschema.validate(json.loads(arguments), PARAMETERS[name])
        else:
            assert content and "<tool_call>" not in content and finish in ("stop", "length")
