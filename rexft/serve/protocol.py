"""The OpenAI API as rexft serve speaks it: request bodies, responses, stream chunks and error bodies (pydantic).

FastAPI validates a request body against its model here strictly (a boolean is not a token count, a number
is not a string) and to what the engines can take: text that is valid Unicode, at most four non-empty stop
strings, a seed that fits 64 bits, sampling values in their ranges. What fails gets OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` with a 400 (``rexft.serve.app``). Fields a backend does
not implement are refused by that backend (``Backend.refuse``); the vLLM backend forwards every field.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator,
                      model_serializer, model_validator)

MAX_STOPS = 4  # OpenAI's limit on stop strings
SEED_RANGE = (-2 ** 63, 2 ** 63 - 1)  # what torch.manual_seed (and vLLM) take
STRICT = ConfigDict(strict=True, extra="forbid")


class APIError(Exception):
    """An OpenAI-style error: the status and the body's fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> "ErrorResponse":
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.kind, param=self.param, code=self.code))


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """OpenAI's error body, also the last event of a stream that failed after it started."""

    error: ErrorDetail


# ------------------------------------------------------------------------------------------- requests
def unicode_text(text: str) -> str:
    """``text``, if it is valid Unicode: JSON's ``"\\ud800"`` escapes decode to lone surrogates, which no
    tokenizer encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"not valid Unicode text (a lone surrogate at character {err.start})") from None
    return text


def text_or(other: str):
    """A field that is a string or ``other`` (a list): validated as the one its value looks like, so an error
    names that one's problem (``field_path`` drops the tags)."""
    return Discriminator(lambda value: "string" if isinstance(value, str) else other)


def string_or_list(value, what: str):
    if value is not None and not isinstance(value, (str, list)):
        raise ValueError(f"must be a string or a list of {what}")
    return value


Text = Annotated[str, AfterValidator(unicode_text)]
StopString = Annotated[str, Field(min_length=1), AfterValidator(unicode_text)]
TokenId = Annotated[int, Field(ge=0)]
TokenCount = Annotated[int, Field(ge=1)]


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant"]
    content: Annotated[Union[Annotated[Text, Tag("string")], Annotated[list[TextPart], Tag("parts")]], text_or("parts")]
    name: Optional[Text] = None

    @field_validator("content", mode="before")
    @classmethod
    def text_or_parts(cls, value):
        return string_or_list(value, "text parts")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class Sampling(BaseModel):
    """What both endpoints share. A null field means its default, as in OpenAI's API. Unknown fields are
    kept (vLLM takes many more) and forwarded; the local backend refuses them by name."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: Text
    max_tokens: Optional[TokenCount] = None  # checked by the app against serve.max_tokens and the context
    temperature: float = Field(1.0, ge=0, le=2)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stop: Optional[Annotated[list[StopString], Field(max_length=MAX_STOPS)]] = None  # a string: a list of one
    seed: Optional[int] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: Optional[dict[Text, Annotated[float, Field(ge=-100, le=100)]]] = None
    user: Optional[Text] = None

    @field_validator("temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def null_is_default(cls, value, info: ValidationInfo):
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("stop", mode="before")
    @classmethod
    def stop_list(cls, value):
        return [value] if isinstance(string_or_list(value, "strings"), str) else value

    @model_validator(mode="after")
    def stream_options_need_a_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def asked_tokens(self) -> int | None:
        """The completion's token limit the client asked for (None: the endpoint's default)."""
        return self.max_tokens


class CompletionRequest(Sampling):
    """/v1/completions: one prompt, as text or as token ids."""

    prompt: Annotated[Union[Annotated[Text, Tag("string")], Annotated[list[TokenId], Field(min_length=1), Tag("token_ids")]],
                      text_or("token_ids")]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    best_of: Optional[int] = Field(None, ge=1, le=20)
    suffix: Optional[Text] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def one_prompt(cls, value):
        """A list of one prompt is that prompt; several are refused (each prompt is routed on its own)."""
        if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
            if len(value) != 1:
                raise ValueError("send one prompt per request (each prompt is routed on its own)")
            value = value[0]
        return string_or_list(value, "token ids")


class ChatRequest(Sampling):
    """/v1/chat/completions: a conversation, rendered as training rendered chats."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[TokenCount] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)

    @field_validator("logprobs", mode="before")
    @classmethod
    def null_is_false(cls, value):
        return False if value is None else value

    def asked_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def dicts(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


GenerationRequest = Union[CompletionRequest, ChatRequest]
FIELDS = frozenset(name for kind in (CompletionRequest, ChatRequest, Message, TextPart, StreamOptions)
                   for name in kind.model_fields)


def field_path(loc: tuple) -> str | None:
    """A validation error's location as OpenAI's ``param`` (``messages.0.content``): the body's fields and
    list indices, up to the first part that names neither (pydantic's tags for a union's members)."""
    path = []
    for part in loc:
        if part == "body" and not path:
            continue
        if not (isinstance(part, int) or part in FIELDS):
            break
        path.append(str(part))
    return ".".join(path) or None


# ------------------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class RouteInfo(BaseModel):
    """``rexft_route``: what served the request and why (``rexft.serve.router.Route``)."""

    adapter: str
    how: str
    cluster: Optional[int] = None
    similarity: Optional[float] = None
    router_ms: float = 0.0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Optional[str] = None


class ResponseBody(BaseModel):
    """What every response and stream chunk carries; each kind fixes ``object`` and its ``choices``."""

    id: str
    object: str
    created: int = Field(default_factory=now)
    model: str
    usage: Optional[Usage] = None
    rexft_route: RouteInfo


class Completion(ResponseBody):
    """A whole completion, and (``usage`` None, ``finish_reason`` None until the last) each of a stream's chunks."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str


class ChatCompletion(ResponseBody):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    """A chat stream's delta: only the fields it carries (the role once, first; then content)."""

    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None

    @model_serializer
    def carried(self) -> dict:
        return {name: value for name, value in (("role", self.role), ("content", self.content)) if value is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Optional[str] = None


class ChatCompletionChunk(ResponseBody):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class Relayed(BaseModel):
    """A response or stream chunk as vLLM wrote it, every field kept; rexft sets ``model`` (the name the
    client asked for) and ``rexft_route``."""

    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    usage: Optional[dict] = None
    rexft_route: Optional[RouteInfo] = None


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    backend: str
    reason: Optional[str] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "rexft"
    root: str
    parent: Optional[str] = None
    rexft_routed: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def event(body: BaseModel) -> str:
    """One server-sent event of a stream."""
    return f"data: {body.model_dump_json()}\n\n"


DONE = "data: [DONE]\n\n"
