"""A chat request's messages as the GGUF's chat template takes them.

Two forms. A template that knows tools (it reads a `tools` variable, as Qwen 2.5's, Llama
3.1's and Hermes' do) gets the tools and the messages as Transformers passes them: an
assistant's `tool_calls` with their arguments as objects, `tool` messages with their
`tool_call_id`. Any other template gets plain (role, content) turns, with the tools
written in the generic format of server/constraints/tools.py: their list in the system
turn, an assistant's calls as `<tool_call>` text, tool results in a user turn.
"""

from __future__ import annotations

import json
from typing import Any

from server.constraints.requests import offers_tools
from server.constraints.tools import call_text, response_text, tools_system_text
from server.schemas import ChatCompletionRequest


def template_input(request: ChatCompletionRequest,
                   knows_tools: bool) -> tuple[list[dict[str, Any]], list[dict] | None]:
    """(messages, tools) for the template; tools is None unless the template lists them."""
    tools = [tool.model_dump(exclude_none=True, by_alias=True)
             for tool in request.tools] if offers_tools(request) else None
    if tools is not None and knows_tools:
        return native_messages(request), tools
    turns = generic_turns(request, tools)
    return [{"role": role, "content": content} for role, content in turns], None


def native_messages(request: ChatCompletionRequest) -> list[dict[str, Any]]:
    messages = []
    for message in request.messages:
        entry: dict[str, Any] = {"role": _role(message.role), "content": message.text}
        if message.tool_calls:
            entry["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name,
                              "arguments": _arguments(call.function.arguments)}}
                for call in message.tool_calls]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        messages.append(entry)
    return messages


def generic_turns(request: ChatCompletionRequest,
                  tools: list[dict] | None) -> list[tuple[str, str]]:
    """(role, text) turns; with tools, in the generic tool format (docs/api.md)."""
    turns: list[tuple[str, str]] = []
    after_tool = False
    for message in request.messages:
        role, text = _role(message.role), message.text
        if message.tool_calls:
            calls = [call_text(call.function.name, call.function.arguments)
                     for call in message.tool_calls]
            text = "\n".join([text, *calls] if text else calls)
        if role == "tool":  # consecutive results share one user turn
            role, text = "user", response_text(text)
            if after_tool:
                text = turns.pop()[1] + "\n" + text
        after_tool = message.role == "tool"
        turns.append((role, text))
    if tools is not None:
        listing = tools_system_text(tools)
        if turns[0][0] == "system":
            turns[0] = ("system", turns[0][1] + "\n\n" + listing)
        else:
            turns.insert(0, ("system", listing))
    return turns


def _role(role: str) -> str:
    return "system" if role == "developer" else role


def _arguments(text: str) -> Any:
    """A call's arguments as Transformers' templates expect them: the parsed object (the
    text itself if it is not JSON)."""
    try:
        return json.loads(text)
    except ValueError:
        return text
