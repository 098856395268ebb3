"""Response bodies and stream chunks for chat.completion and text_completion."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from server.engine.logprobs import TokenLogprob, chat_logprobs, completion_logprobs
from server.engine.sequence import Usage

# The engine's endings that OpenAI's API has no word for: stopped before its natural end.
_PUBLIC_FINISH_REASON = {"timeout": "length", "cancelled": "length"}


def public_finish_reason(reason: str | None, made_calls: bool = False) -> str | None:
    """made_calls: the reply's tool calls are complete ("tool_calls" instead of "stop")."""
    if made_calls and reason == "stop":
        return "tool_calls"
    return _PUBLIC_FINISH_REASON.get(reason, reason)


@dataclass(frozen=True)
class ResponseFormat:
    kind: Literal["chat", "text"]
    model: str
    include_usage: bool = False  # streams only: a final usage chunk, `usage: null` elsewhere
    top_logprobs: int | None = None  # with `logprobs`: top alternatives per token
    prefix_length: int = 0  # an echoed prompt's characters (text offsets count from 0)
    prompt_logprobs: bool = False  # with echo: the prompt tokens' logprobs come first
    include_speculation: bool = False  # streams only: chunks carry a `speculation` object
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            prefix = "chatcmpl-" if self.kind == "chat" else "cmpl-"
            object.__setattr__(self, "id", prefix + uuid.uuid4().hex[:24])
        # A stream's text chunks differ only in their text: encode the rest once, around a
        # placeholder (the body's last string, so rpartition finds it whatever the model
        # name holds); json.dumps of the whole chunk was a fifth of the event loop's time.
        around = self._chunk_body(_PLACEHOLDER, None, False)
        head, _, tail = sse(around).rpartition(encode_text(_PLACEHOLDER))
        object.__setattr__(self, "_text_chunk_parts", (head, tail))

    @property
    def _object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def _envelope(self, object_name: str, choices: list) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created,
                "model": self.model, "choices": choices}

    def _logprobs(self, entries: Sequence[TokenLogprob],
                  prompt_entries: Sequence[TokenLogprob]) -> dict | None:
        if self.top_logprobs is None:
            return None
        if self.kind == "chat":
            return chat_logprobs(entries)
        return completion_logprobs(entries, self.prefix_length, prompt_entries)

    def full(self, text: str, finish_reason: str, usage: Usage,
             logprobs: Sequence[TokenLogprob] = (),
             prompt_logprobs: Sequence[TokenLogprob] = (),
             tool_calls: Sequence[dict] = (), made_calls: bool = False) -> dict:
        """tool_calls: the reply's calls (then `content` is null unless text came first);
        made_calls: they are complete ("tool_calls" instead of "stop")."""
        finish_reason = public_finish_reason(finish_reason, made_calls)
        logprobs_body = self._logprobs(logprobs, prompt_logprobs)
        if self.kind == "chat":
            message: dict = {"role": "assistant", "content": text}
            if tool_calls:
                message = {"role": "assistant", "content": text or None,
                           "tool_calls": list(tool_calls)}
            choice = {"index": 0, "message": message,
                      "logprobs": logprobs_body, "finish_reason": finish_reason}
        else:
            choice = {"text": text, "index": 0, "logprobs": logprobs_body,
                      "finish_reason": finish_reason}
        body = self._envelope(self._object, [choice])
        body["usage"] = usage.as_dict()
        body["speculative"] = usage.speculative_dict()
        return body

    def chunk(self, text: str, finish_reason: str | None = None, is_first: bool = False,
              logprobs: Sequence[TokenLogprob] = (),
              prompt_logprobs: Sequence[TokenLogprob] = (), made_calls: bool = False,
              sources: Sequence[tuple[str, str]] = (), steps: Sequence[int] = ()) -> str:
        """A stream chunk; a text chunk carries the logprobs of the tokens whose text begins
        in it (when asked for), and with `include_speculation` those tokens' texts and
        sources and the tokens per verification step since the last chunk."""
        plain = self.top_logprobs is None and not self.include_speculation
        if finish_reason is None and not is_first and plain:
            head, tail = self._text_chunk_parts
            return head + encode_text(text) + tail
        body = self._chunk_body(text, public_finish_reason(finish_reason, made_calls),
                                is_first)
        if finish_reason is None and not is_first and self.top_logprobs is not None:
            body["choices"][0]["logprobs"] = self._logprobs(logprobs, prompt_logprobs)
        if self.include_speculation and not is_first:
            body["speculation"] = {
                "tokens": [{"text": piece, "source": source} for piece, source in sources],
                "steps": list(steps)}
        return sse(body)

    def _chunk_body(self, text: str, finish_reason: str | None, is_first: bool) -> dict:
        if self.kind == "chat":
            if finish_reason is not None:
                delta: dict = {}
            elif is_first:
                delta = {"role": "assistant", "content": text}
            else:
                delta = {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": finish_reason}
            body = self._envelope("chat.completion.chunk", [choice])
        else:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("text_completion", [choice])
        if self.include_usage:
            body["usage"] = None
        return body

    def tool_calls_chunk(self, deltas: list[dict]) -> str:
        """Stream deltas of tool calls (server/constraints/tools.py, ToolCallParser)."""
        body = self._chunk_body("", None, False)
        body["choices"][0]["delta"] = {"tool_calls": deltas}
        return sse(body)

    def usage_chunk(self, usage: Usage) -> str:
        object_name = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body = self._envelope(object_name, [])
        body["usage"] = usage.as_dict()
        body["speculative"] = usage.speculative_dict()
        return sse(body)


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


encode_text = json.encoder.encode_basestring  # a JSON string, as json.dumps(ensure_ascii=False)
_PLACEHOLDER = "\ue000text\ue000"


SSE_DONE = "data: [DONE]\n\n"
