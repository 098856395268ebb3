"""OpenAI request bodies. Responses are plain dicts built in `server/responses.py`.

Validation is strict about types (a string is not an integer) and lenient about unknown
fields (clients send vendor extras; they are ignored). A null is the same as a field left
out, as in OpenAI's API. Text must be Unicode: JSON can carry a lone UTF-16 surrogate
("\\ud800"), which has no UTF-8 form and so can be neither tokenized nor sent back.
Everything that fails here becomes a 400 `invalid_request_error` with `param` naming the
field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    model_validator,
)

MAX_STOP_STRINGS = 16
MAX_LOGIT_BIAS = 1024
MAX_TOP_LOGPROBS = 20


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"not valid Unicode text: a lone UTF-16 surrogate at character "
                         f"{error.start}") from None
    return text


Text = Annotated[StrictStr, AfterValidator(_unicode)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]
StopList = Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)]
OnePromptList = Annotated[list[Text], Field(min_length=1, max_length=1)]
TokenIds = Annotated[list[StrictInt], Field(min_length=1)]
OneTokenIdsList = Annotated[list[TokenIds], Field(min_length=1, max_length=1)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(min_length=1)]
    name: Text | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Strict):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: StrictStr | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = 0
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    logit_bias: Annotated[dict[StrictStr, Bias], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    seed: int | None = None
    stop: Text | StopList | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None

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
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None

    @property
    def max_new_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: Text | OnePromptList | TokenIds | OneTokenIdsList
    echo: bool = False
    logprobs: TopLogprobs | None = None  # here the number of top alternatives
    suffix: Literal[""] | None = None
    best_of: Literal[1] | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and isinstance(self.prompt[0], str | list):
            self.prompt = self.prompt[0]  # a batch of one prompt
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return 16 if self.max_tokens is None else self.max_tokens
