"""The HTTP face of ``rexft serve``: OpenAI's endpoints in FastAPI, one ``Service`` behind them.

    GET  /health                 200 when the backend answers, 503 (with the reason) when it does not; no key
    GET  /v1/models              the run's name (routed) and, on vLLM, every export by name
    POST /v1/completions         a prompt; ``model`` the run's name (routed) or an export's (direct)
    POST /v1/chat/completions    messages, rendered with the model's chat template

FastAPI validates each body against its model (``rexft.serve.protocol``) and one handler turns what fails,
and every ``APIError``, into OpenAI's error body with a 4xx status, before any backend work. Every response
that a route decided carries the route: the ``x-rexft-route`` header (the adapter), a ``rexft_route`` field
(adapter, how, nearest cluster, similarity, the router's milliseconds) and a line in run_dir/serve/routes.jsonl.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from rexft.data import PromptFormat, message_tokens
from rexft.formats import prompt_of_chat
from rexft.serve.backend import Backend, Call, Event, Failed, Finished, TextDelta
from rexft.serve.protocol import (DONE, APIError, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                  ChatCompletionChunk, ChatRequest, Completion, CompletionChoice, CompletionRequest,
                                  Delta, ErrorDetail, ErrorResponse, GenerationRequest, Health, ModelCard, ModelList,
                                  Relayed, Usage, event, field_path, new_id)
from rexft.serve.router import Route, Router

log = logging.getLogger(__name__)


@dataclass
class Service:
    """What the endpoints need: the run's name, its router, the base model's tokenizer, the backend, the
    adapters a request may name, and the limits."""

    name: str
    router: Router
    tokenizer: object
    backend: Backend
    adapters: list[str]
    fmt: PromptFormat
    max_tokens: int
    context: int
    uses_prior: bool = False  # the local backend's adapter takes a prior per request
    api_key: str | None = None
    route_log: Path | None = None
    endpoint: tuple[Path, dict] | None = None  # endpoint.json and what it says, written once the backend is ready
    log_lock: threading.Lock = field(default_factory=threading.Lock)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """A completion's prompt as given (text with the tokenizer's special tokens, or token ids); a chat's
        messages rendered as training rendered them (the model's chat template, else rexft's plain template)."""
        from jinja2 import TemplateError

        if isinstance(request, ChatRequest):
            try:
                ids = message_tokens(self.tokenizer, self.fmt, request.dicts())
            except TemplateError as err:  # e.g. a template that wants user and assistant turns to alternate
                raise APIError(400, f"the model's chat template refuses these messages: {err}", param="messages",
                               code="invalid_value") from None
        elif isinstance(request.prompt, str):
            ids = self.tokenizer(request.prompt).input_ids
        else:
            ids = request.prompt
            outside = [i for i in ids if i >= len(self.tokenizer)]
            if outside:
                raise APIError(400, f"prompt token id {outside[0]} is outside the vocabulary ({len(self.tokenizer)} "
                                    "tokens)", param="prompt", code="invalid_value")
        if not ids:
            raise APIError(400, "the prompt is empty", param="messages" if isinstance(request, ChatRequest) else "prompt",
                           code="invalid_value")
        return ids

    def routed_text(self, request: GenerationRequest) -> str:
        """What the router embeds: a chat's conversation before the reply, a completion's prompt as text."""
        if isinstance(request, ChatRequest):
            return prompt_of_chat(request.dicts())
        return request.prompt if isinstance(request.prompt, str) else self.tokenizer.decode(request.prompt)

    def record(self, entry: dict) -> None:
        if self.route_log is None:
            return
        with self.log_lock, self.route_log.open("a") as f:
            f.write(json.dumps(entry) + "\n")


# ----------------------------------------------------------------------------------------- the endpoints
api = APIRouter()
bearer = HTTPBearer(auto_error=False)  # a missing key is our 401, in OpenAI's body


def service_of(request: Request) -> Service:
    return request.app.state.service


def authorize(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Service:
    """The service, once the request carries its API key (when it has one)."""
    service = service_of(request)
    key = service.api_key
    if key is not None and (credentials is None or not secrets.compare_digest(credentials.credentials.encode(),
                                                                              key.encode())):
        raise APIError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'", code="invalid_api_key")
    return service


@api.get("/health", response_model=Health)
async def health(request: Request):
    service = service_of(request)
    reason = service.backend.unavailable()
    body = Health(status="ok" if reason is None else "unavailable", backend=service.backend.name, reason=reason)
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=200 if reason is None else 503)


@api.get("/v1/models", response_model=ModelList)
async def models(service: Service = Depends(authorize)) -> ModelList:
    cards = [ModelCard(id=service.name, root=service.name, rexft_routed=True)]
    cards += [ModelCard(id=name, root=name, parent=service.name, rexft_routed=False) for name in service.adapters]
    return ModelList(data=cards)


@api.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, service: Service = Depends(authorize)):
    return await answer(service, body)


@api.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatRequest, service: Service = Depends(authorize)):
    return await answer(service, body)


def token_limit(service: Service, request: GenerationRequest, prompt_tokens: int) -> int:
    """The request's max_tokens (OpenAI's defaults: 16 for a completion, the rest of the context for a chat),
    checked against serve.max_tokens and the context."""
    chat = isinstance(request, ChatRequest)
    room = service.context - prompt_tokens
    asked = request.asked_tokens()
    if asked is None:
        asked = min(service.max_tokens, room) if chat else min(16, service.max_tokens)
    if asked > service.max_tokens:
        raise APIError(400, f"max_tokens={asked} is above this server's limit {service.max_tokens} (serve.max_tokens)",
                       param="max_tokens", code="invalid_value")
    if asked > room or room < 1:
        raise APIError(400, f"this model's maximum context length is {service.context} tokens; the request has "
                            f"{prompt_tokens} prompt tokens and asks for {max(asked, 1)} more",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    return asked


async def answer(service: Service, request: GenerationRequest):
    """A completion or chat request: checked, routed, answered by the backend, its route recorded."""
    clock = time.perf_counter()
    known = [service.name] + service.adapters
    if request.model not in known:
        raise APIError(404, f"the model '{request.model}' does not exist; this server has {known}", param="model",
                       code="model_not_found")
    service.backend.refuse(request)
    if request.model == service.name:
        route, prior = await run_in_threadpool(service.router.route, service.routed_text(request))
    else:
        route, prior = Route(request.model, "named"), None
    ids = await run_in_threadpool(service.prompt_ids, request)
    call = Call(request, route, prior if service.uses_prior else None, ids, token_limit(service, request, len(ids)))
    entry = {"time": time.time(), "endpoint": "chat" if call.chat else "completions", "model": request.model,
             **route.info().model_dump(), "prompt_tokens": len(ids), "stream": request.stream}

    def record(completion_tokens: int | None) -> None:
        service.record({**entry, "completion_tokens": completion_tokens,
                        "latency_ms": round((time.perf_counter() - clock) * 1000, 1)})

    reply = Reply(call, new_id("chatcmpl" if call.chat else "cmpl"))
    events = service.backend.answer(call)
    headers = {"x-rexft-route": route.adapter}
    if not request.stream:
        async with aclosing(events):
            body = await reply.whole(events)
        record(reply.completion_tokens)
        return JSONResponse(body.model_dump(mode="json"), headers=headers)
    first = await anext(events, None)
    if isinstance(first, Failed):  # before the stream starts: a status of its own
        await events.aclose()
        raise first.error
    return StreamingResponse(reply.stream(first, events, record), media_type="text/event-stream", headers=headers)


class Reply:
    """One call's response built from its backend's events: the whole body, or a stream's chunks."""

    def __init__(self, call: Call, id: str):
        self.call, self.id = call, id
        self.model, self.route = call.request.model, call.route.info()
        self.completion_tokens: int | None = None  # as the backend counted them, once it says

    async def whole(self, events: AsyncIterator[Event]) -> Completion | ChatCompletion | Relayed:
        async for item in events:
            if isinstance(item, Failed):
                raise item.error
            if isinstance(item, Relayed):
                return self.relayed(item)
            if isinstance(item, Finished):
                return self.finished(item)
        raise APIError(502, "the backend ended without an answer", kind="server_error")

    def finished(self, done: Finished) -> Completion | ChatCompletion:
        self.completion_tokens = done.completion_tokens
        usage = Usage.of(len(self.call.prompt_ids), done.completion_tokens)
        if self.call.chat:
            choice = ChatChoice(message=AssistantMessage(content=done.text), finish_reason=done.finish_reason)
            return ChatCompletion(id=self.id, model=self.model, choices=[choice], usage=usage, rexft_route=self.route)
        choice = CompletionChoice(text=done.text, finish_reason=done.finish_reason)
        return Completion(id=self.id, model=self.model, choices=[choice], usage=usage, rexft_route=self.route)

    def relayed(self, item: Relayed) -> Relayed:
        self.completion_tokens = (item.usage or {}).get("completion_tokens", self.completion_tokens)
        return item.model_copy(update={"model": self.model, "rexft_route": self.route})

    def chunk(self, text: str | None = None, finish: str | None = None, first: bool = False,
              usage: Usage | None = None) -> str:
        """A stream's event: a text delta, the finish reason, the opening role (chat) or the usage."""
        if self.call.chat:
            choices = [] if usage else [ChatChunkChoice(delta=Delta(role="assistant", content="") if first
                                                        else Delta(content=text), finish_reason=finish)]
            body = ChatCompletionChunk(id=self.id, model=self.model, choices=choices, usage=usage, rexft_route=self.route)
        else:
            choices = [] if usage else [CompletionChoice(text=text or "", finish_reason=finish)]
            body = Completion(id=self.id, model=self.model, choices=choices, usage=usage, rexft_route=self.route)
        return event(body)

    async def stream(self, first: Event | None, events: AsyncIterator[Event], record) -> AsyncIterator[str]:
        """The stream's events, then [DONE]; the backend's iterator is closed however it ends (a client gone)."""
        sent = ""
        try:
            if self.call.chat and not isinstance(first, Relayed):
                yield self.chunk(first=True)
            item = first
            while item is not None:
                if isinstance(item, TextDelta):
                    sent += item.text
                    yield self.chunk(item.text)
                elif isinstance(item, Relayed):
                    yield event(self.relayed(item))
                elif isinstance(item, Finished):
                    rest = item.text[len(sent):] if item.text.startswith(sent) else ""
                    if rest:
                        yield self.chunk(rest)
                    yield self.chunk(finish=item.finish_reason)
                    self.completion_tokens = item.completion_tokens
                    if self.call.request.include_usage:
                        yield self.chunk(usage=Usage.of(len(self.call.prompt_ids), item.completion_tokens))
                elif isinstance(item, Failed):
                    yield event(item.error.body())
                    break
                item = await anext(events, None)
            yield DONE
        finally:
            await events.aclose()
            record(self.completion_tokens)


# --------------------------------------------------------------------------------------------- the app
def create_app(service: Service) -> FastAPI:
    """The endpoints over ``service``; its backend starts with the app and stops with it."""

    @asynccontextmanager
    async def lifespan(app):
        await service.backend.start()
        if service.endpoint:
            path, info = service.endpoint
            path.write_text(json.dumps(info, indent=2) + "\n")
        try:
            yield
        finally:  # uvicorn's shutdown on SIGINT / SIGTERM: the backend (and a supervised vLLM) goes with it
            if service.endpoint:
                service.endpoint[0].unlink(missing_ok=True)
            await service.backend.stop()

    app = FastAPI(title="rexft serve", lifespan=lifespan)
    app.state.service = service
    app.include_router(api)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
    return app


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(mode="json"), status_code=status)


async def api_error(request: Request, err: APIError):
    return error_response(err.status, err.message, err.kind, err.param, err.code)


async def invalid_request(request: Request, err: RequestValidationError):
    """FastAPI's validation of a body, as OpenAI's 400: the first problem, its field (``messages.0.role``)."""
    first = err.errors()[0]
    param = field_path(first["loc"])
    if first["type"] == "json_invalid":
        return error_response(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})",
                              code="invalid_json")
    if param is None and first["type"] == "missing":
        return error_response(400, "the request has no body: send a JSON object", code="invalid_json")
    if param is None and first["type"] in ("model_attributes_type", "dict_type", "model_type"):
        return error_response(400, "the request body must be a JSON object", code="invalid_json")
    message = first["msg"].removeprefix("Value error, ")
    return error_response(400, f"{param}: {message}" if param else message, param=param,
                          code="missing_field" if first["type"] == "missing" else "invalid_value")


async def http_error(request: Request, err: HTTPException):
    message = "no such endpoint" if err.status_code == 404 else str(err.detail)
    return error_response(err.status_code, f"{message}: {request.method} {request.url.path}", code=str(err.status_code))


async def unexpected(request: Request, err: Exception):
    log.exception("unexpected error serving %s", request.url.path)
    return error_response(500, f"internal error: {type(err).__name__}: {err}", "server_error")
