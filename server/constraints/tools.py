"""Tool calls: how tools reach the prompt, the grammar of a call, and reading calls back.

The format is the one Hermes and Qwen 2.5 models are trained on, and it is documented in
docs/api.md: the tools are listed in the system turn as JSON inside `<tools>` tags, and
each call is one line of JSON inside `<tool_call>` tags:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A tool's result goes back to the model in a user turn, inside `<tool_response>` tags. The
grammar holds each call to a declared function with arguments valid under its `parameters`
schema, so the reply always parses.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from verifier.grammar import with_json_options

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
_HEADER = re.compile(r'\n?<tool_call>\n\{"name": "([A-Za-z0-9_-]+)", "arguments": ')
_TRAILER = "}" + CLOSE

SYSTEM_TEXT = (
    "You may call one or more functions to assist with the user query. The functions are "
    "listed as JSON within <tools></tools> tags:\n<tools>\n{tools}\n</tools>\n\n"
    "To call a function, reply with a JSON object holding its name and arguments within "
    "<tool_call></tool_call> tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def tools_system_text(tools: list[dict]) -> str:
    """The tool list for the system turn; tools: OpenAI `tools` entries as dicts."""
    return SYSTEM_TEXT.format(
        tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))


def call_text(name: str, arguments: str) -> str:
    """An earlier call as the model would have written it (for the conversation's
    assistant turns)."""
    return f'{OPEN}{{"name": "{name}", "arguments": {arguments}}}{CLOSE}'


def response_text(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


def tools_lark(functions: dict[str, dict], may_answer: bool, parallel: bool,
               answer_schema: dict | None = None) -> str:
    """A Lark grammar (llguidance's dialect) for the reply.

    functions: name → `parameters` schema, the functions the reply may call. may_answer
    (`tool_choice: auto`): the reply may instead be an answer, free text that does not begin
    like a call, or JSON under answer_schema when a response_format asks for it.
    """
    rules = []
    for index, (name, parameters) in enumerate(functions.items()):
        head = json.dumps(f'{{"name": "{name}", "arguments": ')
        rules.append(f"fn_{index}: {head} args_{index} \"}}\"")
        rules.append(f"args_{index}: %json {json.dumps(with_json_options(parameters))}")
    alternatives = " | ".join(f"fn_{index}" for index in range(len(functions)))
    calls = 'call ("\\n" call)*' if parallel else "call"
    lines = [f"start: calls{' | answer' if may_answer else ''}",
             f"calls: {calls}",
             f"call: {json.dumps(OPEN)} ({alternatives}) {json.dumps(CLOSE)}", *rules]
    if may_answer and answer_schema is not None:
        lines.append(f"answer: %json {json.dumps(with_json_options(answer_schema))}")
    elif may_answer:
        lines += ["answer: TEXT", "TEXT: /(?s:.+)/ & ~/<tool_call>(?s:.*)/"]
    return "\n".join(lines)


@dataclass
class ToolCall:
    name: str
    arguments: str = ""
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def as_dict(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


class ToolCallParser:
    """Splits a reply into content and tool calls as its text arrives.

    `push` returns the content to emit now and the calls' stream deltas, as OpenAI streams
    them: a call's first delta has its index, id, type and name with empty arguments, the
    next ones pieces of the arguments that concatenate to the whole JSON text. Text that may
    still become a call (a prefix of `<tool_call>`) is held back until it is known.
    """

    def __init__(self, may_answer: bool) -> None:
        self.calls: list[ToolCall] = []
        self._text = ""
        self._position = 0  # of the text, consumed into calls
        self._is_calls: bool | None = None if may_answer else True
        self._part = "header"  # of a call: header, arguments, trailer
        self._depth = 0
        self._in_string = self._escaped = False

    @property
    def made_calls(self) -> bool:
        """Whether the reply is complete calls (not cut in one by a stop string or a limit:
        `finish_reason` is then that cut's, and the last call's arguments are partial)."""
        return bool(self.calls) and self._part == "header"

    def push(self, text: str) -> tuple[str, list[dict]]:
        self._text += text
        if self._is_calls is None:
            if OPEN.startswith(self._text) and len(self._text) < len(OPEN):
                return "", []  # undecided
            self._is_calls = self._text.startswith(OPEN)
            if not self._is_calls:
                return self._text, []
        elif not self._is_calls:
            return text, []
        return "", self._parse()

    def flush(self) -> str:
        """At the end: held-back text that never became a call is content."""
        if self._is_calls is None:
            self._is_calls = False
            return self._text
        return ""

    def _parse(self) -> list[dict]:
        deltas: list[dict] = []
        while True:
            if self._part == "header":
                match = _HEADER.match(self._text, self._position)
                if match is None:
                    return deltas
                call = ToolCall(match.group(1))
                self.calls.append(call)
                deltas.append({"index": len(self.calls) - 1, **call.as_dict()})
                self._position = match.end()
                self._part, self._depth = "arguments", 0
            elif self._part == "arguments":
                start, end = self._position, self._scan_arguments()
                piece = self._text[start:end]
                if piece:
                    self.calls[-1].arguments += piece
                    deltas.append({"index": len(self.calls) - 1,
                                   "function": {"arguments": piece}})
                self._position = end
                if self._part == "arguments":
                    return deltas
            else:
                if len(self._text) - self._position < len(_TRAILER):
                    return deltas
                self._position += len(_TRAILER)
                self._part = "header"

    def _scan_arguments(self) -> int:
        """Walk the arguments' JSON text; where it ends, switch to the trailer. Returns the
        position reached."""
        text = self._text
        position = self._position
        while position < len(text):
            char = text[position]
            position += 1
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._part = "trailer"
                    return position
        return position
