"""The OpenAI API as rexft serve speaks it: request bodies (pydantic), error bodies, responses and stream chunks.

Requests are checked here and by the app (``rexft.serve.app``) before any backend sees them; a bad one gets
OpenAI's error body ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status. Fields rexft's
local backend does not implement (``n`` > 1, ``logprobs``, ``echo``...) are refused by name there; the vLLM
backend forwards every field as the client sent it.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class APIError(Exception):
    """An OpenAI-style error: the status and the body's fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class Sampling(BaseModel):
    """What both endpoints share. Unknown fields are kept (vLLM takes many more) and forwarded."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: Optional[int] = None  # checked by the app against serve.max_tokens and the context
    temperature: float = Field(1.0, ge=0, le=2)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[dict] = None
    n: int = Field(1, ge=1)

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(Sampling):
    prompt: Union[str, list[str]]

    @field_validator("prompt")
    @classmethod
    def one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("send one prompt per request (each prompt is routed on its own)")
            return value[0]
        return value


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None

    def dicts(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


# ------------------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(chat: bool, id: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
             route: dict) -> dict:
    """A whole completion (``text_completion``) or chat completion (``chat.completion``)."""
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish} if chat
              else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
    return {"id": id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(prompt_tokens, completion_tokens), "rexft_route": route}


def chunk(chat: bool, id: str, model: str, text: str | None, finish: str | None, route: dict, first: bool = False,
          use: dict | None = None) -> str:
    """One server-sent event of a stream: a text delta, the finish reason, or (``use``) the usage chunk."""
    if use is not None:
        choices = []
    elif chat:
        delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
        choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    body = {"id": id, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "rexft_route": route}
    if use is not None:
        body["usage"] = use
    return f"data: {json.dumps(body)}\n\n"


DONE = "data: [DONE]\n\n"
