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


FunctionName = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
JsonObject = dict[StrictStr, Any]


class CalledFunction(_Strict):
    name: FunctionName
    arguments: Text  # JSON text, as the server sent it


class ToolCall(_Strict):
    id: StrictStr
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[TextPart], Field(min_length=1)] | None = None
    name: Text | None = None
    tool_calls: Annotated[list[ToolCall], Field(min_length=1)] | None = None  # assistant's
    tool_call_id: StrictStr | None = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _fields_of_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id, the id of the call it answers")
        if self.content is None and self.tool_calls is None:
            raise ValueError(f"a {self.role} message needs content")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchemaSpec(_Strict):
    name: FunctionName
    description: Text | None = None
    schema_: JsonObject = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormatField = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat,
                                Field(discriminator="type")]


class FunctionDefinition(_Strict):
    name: FunctionName
    description: Text | None = None
    # none given: a function without parameters (its arguments are {})
    parameters: JsonObject = Field(
        default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionChoice(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionChoice


MAX_TOOLS = 128


class StreamOptions(_Strict):
    include_usage: bool = False
    # Dovetail's extension (the chat page): each chunk says where its tokens came from
    include_speculation: bool = False


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

    @property
    def include_speculation(self) -> bool:
        return self.stream and self.stream_options is not None and \
            self.stream_options.include_speculation


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    response_format: ResponseFormatField | None = None
    tools: Annotated[list[Tool], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @property
    def max_new_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: Text | OnePromptList | TokenIds | OneTokenIdsList
    response_format: ResponseFormatField | None = None  # an extension here, as in vLLM
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
