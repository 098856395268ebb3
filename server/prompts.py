"""From an OpenAI request to what the engine needs: prompt tokens, limits, sampling."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import chain
from typing import Any

from server.chat_messages import template_input
from server.errors import APIError
from server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from verifier.chat_template import ChatTemplateError
from verifier.sampling import SamplingParams
from verifier.target import Target
from verifier.tokenizer import Tokenizer


def chat_prompt_tokens(target: Target, request: ChatCompletionRequest) -> list[int]:
    """The rendered chat's tokens. Special-token text inside a message (`<|im_end|>` typed by
    a user) is read as plain text, so a message cannot forge the template's turns; only the
    template's own text becomes control tokens."""
    if target.chat_template is None:
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    tokenizer = target.tokenizer
    messages, tools = template_input(request, target.chat_template.knows_tools)
    (messages, tools), literals = _mask_special_text(tokenizer, (messages, tools))
    try:
        text = target.chat_template.render(messages, add_generation_prompt=True, tools=tools)
    except ChatTemplateError as error:
        raise APIError(400, f"the chat template rejected the messages: {error}",
                       "messages") from error
    # BOS as the metadata says, unless the template already wrote it.
    bos_text = target.chat_template.bos_token
    add_bos = tokenizer.adds_bos and not (bos_text and text.startswith(bos_text))
    if not literals:
        return tokenizer.encode(text, add_bos=add_bos, parse_special=True)
    return tokenizer.encode_with_literals(text, literals, add_bos=add_bos)


_PRIVATE_USE = (range(0xE000, 0xF900), range(0xF0000, 0xFFFFE), range(0x100000, 0x10FFFE))


def _strings(value: Any) -> Iterator[str]:
    """Every string in a structure of dicts, lists and tuples (keys included)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def _map_strings(value: Any, change: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {change(key): _map_strings(item, change) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_map_strings(item, change) for item in value)
    return value


def _mask_special_text(tokenizer: Tokenizer, value: Any) -> tuple[Any, dict[str, str]]:
    """Each special token's text in the value's strings (messages, tools) → a private-use
    character absent from them; returns the masked value and {character: the text it
    stands for}."""
    pattern = tokenizer.special_text
    contents = list(_strings(value))
    found = sorted({text for content in contents for text in pattern.findall(content)}) \
        if pattern else []
    if not found:
        return value, {}
    used = set().union(*contents)
    free = (chr(code) for code in chain(*_PRIVATE_USE) if chr(code) not in used)
    marks = {text: next(free, None) for text in found}
    if None in marks.values():
        raise APIError(400, "the messages hold special-token text and use every private-use "
                            "character, which masking it needs", "messages")
    masked = _map_strings(value, lambda text: pattern.sub(lambda m: marks[m.group()], text))
    return masked, {mark: text for text, mark in marks.items()}


def completion_prompt_tokens(target: Target, request: CompletionRequest) -> list[int]:
    tokenizer = target.tokenizer
    if isinstance(request.prompt, str):
        tokens = tokenizer.encode(request.prompt, add_bos=tokenizer.adds_bos, parse_special=True)
    else:
        tokens = list(request.prompt)
        bad = [t for t in tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary "
                                f"(0..{tokenizer.vocab_size - 1})", "prompt")
    if not tokens:
        raise APIError(400, "prompt: the prompt is empty", "prompt")
    return tokens


def requested_logprobs(request: ChatCompletionRequest | CompletionRequest) -> int | None:
    """How many top alternatives per token `logprobs` asks for; None when not asked."""
    if isinstance(request, ChatCompletionRequest):
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (request.top_logprobs or 0) if request.logprobs else None
    return request.logprobs


def completion_budget(num_prompt_tokens: int, requested: int | None, ctx_size: int,
                      param: str) -> int:
    """Tokens the completion may have; 400 `context_length_exceeded` when it cannot fit."""
    available = ctx_size - num_prompt_tokens
    if available < 1 or (requested is not None and requested > available):
        asked = f" plus {requested} completion tokens" if requested is not None else ""
        raise APIError(
            400,
            f"this model's context is {ctx_size} tokens; the prompt has {num_prompt_tokens}"
            f" tokens{asked}. Shorten the prompt or lower {param}.",
            param="messages" if requested is None else param,
            code="context_length_exceeded",
        )
    return available if requested is None else requested


def sampling_params(request: SamplingFields, vocab_size: int) -> SamplingParams:
    logit_bias: dict[int, float] = {}
    for key, bias in (request.logit_bias or {}).items():
        token = int(key) if key.isascii() and key.isdigit() else -1  # not " 1", "1_0", "٣"
        if not 0 <= token < vocab_size:
            raise APIError(400, f"logit_bias: '{key}' is not a token id in 0..{vocab_size - 1}",
                           "logit_bias")
        logit_bias[token] = bias
    return SamplingParams(
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=max(request.top_k, 0),
        min_p=request.min_p,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logit_bias=logit_bias,
        seed=request.seed,
    )
