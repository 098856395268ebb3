"""OpenAI request bodies. Responses are plain dicts built in `server/responses.py`.

Validation is strict about types (a string is not an integer) and lenient about unknown
fields (clients send vendor extras; they are ignored). Everything that fails here becomes a
400 `invalid_request_error` with `param` naming the field.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

MAX_STOP_STRINGS = 16
MAX_LOGIT_BIAS = 1024


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, Annotated[list[TextPart], Field(min_length=1)]]
    name: Optional[StrictStr] = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Strict):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: Optional[StrictStr] = None
    max_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = 0
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    logit_bias: Optional[
        Annotated[dict[StrictStr, Annotated[float, Field(ge=-100.0, le=100.0)]],
                  Field(max_length=MAX_LOGIT_BIAS)]
    ] = None
    seed: Optional[int] = None
    stop: Optional[
        Union[StrictStr, Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)]]
    ] = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[Literal[False]] = None
    user: Optional[StrictStr] = None

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    top_logprobs: Optional[Literal[0]] = None

    @property
    def max_new_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: Union[
        StrictStr,
        Annotated[list[StrictStr], Field(min_length=1, max_length=1)],
        Annotated[list[StrictInt], Field(min_length=1)],
    ]
    echo: bool = False
    suffix: Optional[Literal[""]] = None
    best_of: Optional[Literal[1]] = None

    @model_validator(mode="after")
    def _one_prompt(self) -> "CompletionRequest":
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            self.prompt = self.prompt[0]
        return self

    @property
    def max_new_tokens(self) -> Optional[int]:
        return 16 if self.max_tokens is None else self.max_tokens
