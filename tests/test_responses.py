"""Stream chunks: the text chunks, encoded once around their text, equal the chunk built
and encoded whole, whatever the text and the model name hold."""

from __future__ import annotations

import json

import pytest

from server.responses import _PLACEHOLDER, ResponseFormat, sse

TEXTS = ["", "hello", ' "quoted" \\ back', "line\nbreak\ttab\x00\x1f", "naïve 日本 🙂",
         _PLACEHOLDER, "}]}\n\ndata: [DONE]"]


def whole_chunk(fmt: ResponseFormat, text: str) -> dict:
    """The chunk as the API describes it, built field by field."""
    if fmt.kind == "chat":
        choice = {"index": 0, "delta": {"content": text}, "logprobs": None,
                  "finish_reason": None}
        body = {"id": fmt.id, "object": "chat.completion.chunk", "created": fmt.created,
                "model": fmt.model, "choices": [choice]}
    else:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": None}
        body = {"id": fmt.id, "object": "text_completion", "created": fmt.created,
                "model": fmt.model, "choices": [choice]}
    if fmt.include_usage:
        body["usage"] = None
    return body


@pytest.mark.parametrize("kind", ["chat", "text"])
@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("model", ["default", _PLACEHOLDER, 'od"d\\名'])
def test_text_chunks_equal_the_whole_encoding(kind, include_usage, model):
    fmt = ResponseFormat(kind, model, include_usage=include_usage)
    for text in TEXTS:
        chunk = fmt.chunk(text)
        assert chunk == sse(whole_chunk(fmt, text))  # byte for byte, key order included
        assert chunk.startswith("data: ") and chunk.endswith("\n\n")
        assert json.loads(chunk.removeprefix("data: "))["choices"][0] == \
            whole_chunk(fmt, text)["choices"][0]


def test_first_and_last_chunks_keep_their_own_fields():
    fmt = ResponseFormat("chat", "m", include_usage=True)
    first = json.loads(fmt.chunk("hi", is_first=True).removeprefix("data: "))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "hi"}
    last = json.loads(fmt.chunk("", finish_reason="cancelled").removeprefix("data: "))
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                  "finish_reason": "length"}
    assert last["usage"] is None
