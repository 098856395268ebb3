"""From a request's `response_format`, `tools` and `tool_choice` to its grammar.

Everything is checked before the request reaches the engine: a schema llguidance cannot
compile, a function named twice, a `tool_choice` naming a function that is not there — each
is a 400 whose `param` names the field and whose message carries llguidance's reason.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from server.constraints.tools import ToolCallParser, tools_lark
from server.errors import APIError
from server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    JsonObjectFormat,
    JsonSchemaFormat,
    NamedToolChoice,
)
from verifier.grammar import Grammar, GrammarCompiler, GrammarError
from verifier.tokenizer import Tokenizer

ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class Structure:
    """What a request asks of its reply's shape."""

    grammar: Grammar | None = None
    uses_tools: bool = False  # the reply is read for tool calls
    may_answer: bool = True  # with tools: the reply may be an answer instead of calls

    def tool_parser(self) -> ToolCallParser | None:
        return ToolCallParser(self.may_answer) if self.uses_tools else None


@functools.cache
def grammar_compiler(tokenizer: Tokenizer) -> GrammarCompiler:
    """One compiler per model, made when first asked (reading the vocabulary takes about
    half a second)."""
    return GrammarCompiler(tokenizer)


def answer_schema(body: ChatCompletionRequest | CompletionRequest) -> dict | None:
    """The JSON schema `response_format` asks for, or None for free text."""
    fmt = body.response_format
    if isinstance(fmt, JsonObjectFormat):
        return ANY_OBJECT
    if isinstance(fmt, JsonSchemaFormat):
        return fmt.json_schema.schema_
    return None


def offers_tools(body: ChatCompletionRequest) -> bool:
    """Whether the tools are shown to the model and may be called."""
    return body.tools is not None and body.tool_choice != "none"


def request_structure(tokenizer: Tokenizer,
                      body: ChatCompletionRequest | CompletionRequest) -> Structure:
    is_chat = isinstance(body, ChatCompletionRequest)
    if is_chat and body.tools is None and body.tool_choice not in (None, "none", "auto"):
        raise APIError(400, "tool_choice asks for a tool call, but the request has no tools",
                       "tool_choice")
    schema = answer_schema(body)
    with_tools = is_chat and offers_tools(body)
    if schema is None and not with_tools:
        return Structure()  # the common case, which needs no compiler
    compiler = grammar_compiler(tokenizer)
    answer = None if schema is None else _check(
        compiler, compiler.json_schema(schema), "response_format", "the response_format schema")
    if not with_tools:
        return Structure(answer)
    functions: dict[str, dict] = {}
    for tool in body.tools:
        name = tool.function.name
        if name in functions:
            raise APIError(400, f"tools: the function '{name}' is defined twice", "tools")
        _check(compiler, compiler.json_schema(tool.function.parameters), "tools",
               f"the parameters of function '{name}'")
        functions[name] = tool.function.parameters
    choice = body.tool_choice or "auto"
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in functions:
            raise APIError(400, f"tool_choice names the function '{name}', which is not "
                                "among the tools", "tool_choice")
        functions = {name: functions[name]}
    may_answer = choice == "auto"
    lark = tools_lark(functions, may_answer, parallel=body.parallel_tool_calls,
                      answer_schema=schema)
    grammar = _check(compiler, compiler.lark(lark), "tools", "the tools' grammar")
    return Structure(grammar, uses_tools=True, may_answer=may_answer)


def _check(compiler: GrammarCompiler, grammar: str, param: str, what: str) -> Grammar:
    try:
        return compiler.grammar(grammar)
    except GrammarError as error:
        raise APIError(400, f"{what} cannot be used: {error}", param) from error
