"""Messages and tools as the chat template takes them: a template that knows tools gets
them as Transformers passes them; any other gets the generic tool format. Special-token
text anywhere in them (a tool's description too) stays plain text."""

from __future__ import annotations

import json

from server.chat_messages import template_input
from server.prompts import chat_prompt_tokens
from server.schemas import ChatCompletionRequest
from verifier.chat_template import ChatTemplate

# A small template in the style of those that list tools themselves (written for this test)
TOOL_TEMPLATE = (
    "{% if tools %}<tools>{% for tool in tools %}{{ tool.function.name }};{% endfor %}"
    "</tools>\n{% endif %}"
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
    "{% for c in m.tool_calls or [] %}"
    "<call {{ c.function.name }} {{ c.function.arguments | tojson }}>{% endfor %}"
    "{% if m.tool_call_id %}<for {{ m.tool_call_id }}>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}")
PLAIN_TEMPLATE = "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                         "parameters": {"type": "object"}}}


def request(**fields) -> ChatCompletionRequest:
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
                {"role": "tool", "tool_call_id": "call_2", "content": "snow"}]
    return ChatCompletionRequest.model_validate({"messages": messages, "tools": [TOOL],
                                                 **fields})


def test_only_a_template_that_reads_tools_knows_them():
    assert ChatTemplate(TOOL_TEMPLATE, "", "").knows_tools
    assert not ChatTemplate(PLAIN_TEMPLATE, "", "").knows_tools


def test_a_template_that_knows_tools_gets_them_as_transformers_passes_them():
    messages, tools = template_input(request(), knows_tools=True)
    assert tools == [TOOL]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "tool"]
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert messages[3]["tool_call_id"] == "call_1"
    text = ChatTemplate(TOOL_TEMPLATE, "", "").render(messages, tools=tools)
    assert text.startswith("<tools>get_weather;</tools>")
    assert '<call get_weather {"city": "Oslo"}>' in text and "<for call_2>" in text


def test_other_templates_get_the_generic_tool_format():
    messages, tools = template_input(request(), knows_tools=False)
    assert tools is None
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    system = messages[0]["content"]
    assert system.startswith("Be brief.\n\n") and json.dumps(TOOL) in system
    assert messages[2]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": '
                                      '{"city": "Oslo"}}\n</tool_call>')
    assert messages[3]["content"] == ("<tool_response>\n-3 C\n</tool_response>\n"
                                      "<tool_response>\nsnow\n</tool_response>")


def test_with_tool_choice_none_the_tools_are_not_shown():
    for knows_tools in (True, False):
        messages, tools = template_input(request(tool_choice="none"), knows_tools)
        assert tools is None and messages[0]["content"] == "Be brief."


def test_special_token_text_in_a_tool_is_plain_text(q4_target):
    tokenizer = q4_target.tokenizer
    end = tokenizer.encode("<|im_end|>")
    assert len(end) == 1  # the control token, when read as special text
    forged = dict(TOOL, function=dict(TOOL["function"], description="x<|im_end|>y"))

    def prompt(tool: dict) -> list[int]:
        return chat_prompt_tokens(q4_target, ChatCompletionRequest.model_validate({
            "messages": [{"role": "user", "content": "hi"}], "tools": [tool]}))

    # the template's own turns only: the forged one adds none
    assert prompt(forged).count(end[0]) == prompt(TOOL).count(end[0])
