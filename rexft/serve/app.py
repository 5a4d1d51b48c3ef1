"""The HTTP face of ``rexft serve``: OpenAI's endpoints in FastAPI, one ``Service`` behind them.

    GET  /health                 200 when the backend answers, 503 (with the reason) when it does not; no key
    GET  /v1/models              the run's name (routed) and, on vLLM, every export by name
    POST /v1/completions         a prompt; ``model`` the run's name (routed) or an export's (direct)
    POST /v1/chat/completions    messages, rendered with the model's chat template

Every response that a route decided carries the route: the ``x-rexft-route`` header (the adapter) and a
``rexft_route`` field (adapter, how, nearest cluster, similarity, the router's milliseconds), and a line in
run_dir/serve/routes.jsonl. Bad requests get OpenAI's error body with a 4xx status before any backend work,
and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from rexft.data import PromptFormat, message_tokens
from rexft.formats import prompt_of_chat
from rexft.serve.protocol import (DONE, APIError, ChatRequest, CompletionRequest, chunk, error_body, new_id,
                                  response, usage)
from rexft.serve.router import Route, Router

log = logging.getLogger(__name__)
# Fields the local backend does not implement: refused by name (vLLM takes them as sent).
LOCAL_UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "tools", "tool_choice", "functions",
                     "response_format", "logit_bias", "presence_penalty", "frequency_penalty")


@dataclass
class Service:
    """What the endpoints need: the run's name, its router, the base model's tokenizer, the backend (a
    ``LocalBackend`` or a ``VllmBackend``), the adapters a request may name, and the limits."""

    name: str
    router: Router
    tokenizer: object
    backend: object
    adapters: list[str]
    fmt: PromptFormat
    max_tokens: int
    context: int
    uses_prior: bool = False  # the local backend's adapter takes a prior per request
    api_key: str | None = None
    route_log: Path | None = None
    endpoint: tuple[Path, dict] | None = None  # endpoint.json and what it says, written once the backend is ready
    log_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def local(self) -> bool:
        from rexft.serve.local import LocalBackend

        return isinstance(self.backend, LocalBackend)

    def prompt_ids(self, chat: bool, request) -> list[int]:
        """A completion's prompt as given (with the tokenizer's special tokens); a chat's messages rendered as
        training rendered them (the model's chat template, else rexft's plain template)."""
        if chat:
            return message_tokens(self.tokenizer, self.fmt, request.dicts())
        return self.tokenizer(request.prompt).input_ids

    def record(self, entry: dict) -> None:
        if self.route_log is None:
            return
        with self.log_lock, self.route_log.open("a") as f:
            f.write(json.dumps(entry) + "\n")


# ----------------------------------------------------------------------------------------- the endpoints
api = APIRouter()


def service_of(request: Request) -> Service:
    return request.app.state.service


def authorize(request: Request) -> Service:
    """The service, once the request carries its API key (when it has one)."""
    service = service_of(request)
    if service.api_key is not None and request.headers.get("authorization", "") != f"Bearer {service.api_key}":
        raise APIError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'", code="invalid_api_key")
    return service


@api.get("/health")
async def health(request: Request):
    service = service_of(request)
    ready = service.local or service.backend.healthy
    body = {"status": "ok" if ready else "unavailable", "backend": "local" if service.local else "vllm"}
    if not ready:
        body["reason"] = service.backend.unavailable(RuntimeError("health")).message
    return JSONResponse(body, status_code=200 if ready else 503)


@api.get("/v1/models")
async def models(request: Request):
    service = authorize(request)
    created = int(time.time())
    data = [{"id": service.name, "object": "model", "created": created, "owned_by": "rexft", "root": service.name,
             "parent": None, "rexft_routed": True}]
    data += [{"id": name, "object": "model", "created": created, "owned_by": "rexft", "root": name,
              "parent": service.name, "rexft_routed": False} for name in service.adapters]
    return {"object": "list", "data": data}


@api.post("/v1/completions")
async def completions(request: Request):
    return await answer(request, chat=False)


@api.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await answer(request, chat=True)


async def parse(request: Request, kind) -> tuple[dict, object]:
    """(the JSON body, the request model), or a 400 naming what is wrong."""
    try:
        body = json.loads(await request.body())
    except ValueError as err:
        raise APIError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return body, kind.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param,
                       code="missing_field" if first["type"] == "missing" else "invalid_value") from None


def token_limit(service: Service, req, prompt_tokens: int, chat: bool) -> int:
    """The request's max_tokens (OpenAI's defaults: 16 for a completion, the rest of the context for a chat),
    checked against serve.max_tokens and the context."""
    asked = req.max_completion_tokens if chat and req.max_completion_tokens is not None else req.max_tokens
    if asked is None:
        asked = min(service.max_tokens, service.context - prompt_tokens) if chat else min(16, service.max_tokens)
    if asked < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {asked}", param="max_tokens", code="invalid_value")
    if asked > service.max_tokens:
        raise APIError(400, f"max_tokens={asked} is above this server's limit {service.max_tokens} (serve.max_tokens)",
                       param="max_tokens", code="invalid_value")
    if prompt_tokens + asked > service.context:
        raise APIError(400, f"this model's maximum context length is {service.context} tokens; the request has "
                            f"{prompt_tokens} prompt tokens and asks for {asked} more",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    return asked


def refuse_unsupported(req) -> None:
    """The local backend names the first field it does not implement."""
    used = [name for name in LOCAL_UNSUPPORTED if (req.model_extra or {}).get(name) not in (None, False, 0, [], {})]
    used += ["n"] if req.n != 1 else []
    if used:
        raise APIError(400, f"'{used[0]}' is not supported by the local backend (serve.backend=vllm takes it)",
                       param=used[0], code="unsupported_parameter")


async def answer(request: Request, chat: bool):
    """A completion or chat request: checked, routed, answered by the backend, its route recorded."""
    service = authorize(request)
    clock = time.perf_counter()
    body, req = await parse(request, ChatRequest if chat else CompletionRequest)
    known = [service.name] + service.adapters
    if req.model not in known:
        raise APIError(404, f"the model '{req.model}' does not exist; this server has {known}", param="model",
                       code="model_not_found")
    if service.local:
        refuse_unsupported(req)
    if req.model == service.name:
        text = prompt_of_chat(req.dicts()) if chat else req.prompt
        route, prior = await run_in_threadpool(service.router.route, text)
    else:
        route, prior = Route(req.model, "named"), None
    ids = await run_in_threadpool(service.prompt_ids, chat, req)
    limit = token_limit(service, req, len(ids), chat)
    entry = {"time": time.time(), "endpoint": "chat" if chat else "completions", "model": req.model,
             **route.fields(), "prompt_tokens": len(ids), "stream": req.stream}

    def record(completion_tokens: int | None) -> None:
        service.record({**entry, "completion_tokens": completion_tokens,
                        "latency_ms": round((time.perf_counter() - clock) * 1000, 1)})

    if service.local:
        result = await local_answer(service, chat, req, route, ids, prior, limit, record)
    else:
        result = await vllm_answer(service, chat, body, req, route, limit, record)
    headers = {"x-rexft-route": route.adapter}
    if isinstance(result, dict):
        record(result.get("usage", {}).get("completion_tokens"))
        return JSONResponse(result, headers=headers)
    return StreamingResponse(result, media_type="text/event-stream", headers=headers)


async def local_answer(service: Service, chat: bool, req, route: Route, ids: list[int], prior, limit: int, record):
    """The local backend's answer: a response dict, or a stream's events."""
    from rexft.serve.local import Job

    prior = prior if service.uses_prior else None
    job = service.backend.submit(Job(ids, prior, limit, req.temperature, req.top_p, tuple(req.stops), req.seed,
                                     asyncio.get_running_loop()))
    rid, fields = new_id("chatcmpl" if chat else "cmpl"), route.fields()
    if not req.stream:
        try:
            while (event := await job.events.get())[0] == "delta":
                pass
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        if event[0] == "error":
            raise APIError(500, event[1], kind="server_error")
        _, text, finish, n = event
        return response(chat, rid, req.model, text, finish, len(ids), n, fields)

    async def events():
        done = False
        try:
            if chat:
                yield chunk(True, rid, req.model, None, None, fields, first=True)
            while (event := await job.events.get())[0] == "delta":
                yield chunk(chat, rid, req.model, event[1], None, fields)
            if event[0] == "error":
                yield f"data: {json.dumps(error_body(event[1], 'server_error'))}\n\n"
            else:
                _, text, finish, n = event
                rest = text[len(job.sent):] if text.startswith(job.sent) else ""
                if rest:
                    yield chunk(chat, rid, req.model, rest, None, fields)
                yield chunk(chat, rid, req.model, None, finish, fields)
                if req.include_usage:
                    yield chunk(chat, rid, req.model, None, None, fields, use=usage(len(ids), n))
                record(n)
            yield DONE
            done = True
        finally:
            if not done:  # the client went away: its row leaves the decoding batch
                job.cancelled = True

    return events()


async def vllm_answer(service: Service, chat: bool, body: dict, req, route: Route, limit: int, record):
    """vLLM's answer to the request as the client sent it, ``model`` set to the route's adapter: a response
    dict, or its stream passed through chunk by chunk (each chunk naming the route)."""
    forwarded = {**body, "model": route.adapter, "max_tokens": limit}
    forwarded.pop("max_completion_tokens", None)
    upstream = await service.backend.send("/v1/chat/completions" if chat else "/v1/completions", forwarded)
    fields = route.fields()
    if not req.stream:
        try:
            data = json.loads(await upstream.aread())
        finally:
            await upstream.aclose()
        data["model"], data["rexft_route"] = req.model, fields
        return data

    async def relay():
        completion_tokens = None
        try:
            async for line in upstream.aiter_lines():
                if line.startswith("data: {"):
                    data = json.loads(line[6:])
                    data["model"], data["rexft_route"] = req.model, fields
                    if data.get("usage"):
                        completion_tokens = data["usage"].get("completion_tokens")
                    line = "data: " + json.dumps(data)
                yield line + "\n"
        finally:
            await upstream.aclose()
            record(completion_tokens)

    return relay()


# --------------------------------------------------------------------------------------------- the app
def create_app(service: Service) -> FastAPI:
    """The endpoints over ``service``; its backend starts with the app and stops with it."""

    @asynccontextmanager
    async def lifespan(app):
        if not service.local:
            await service.backend.start()
        if service.endpoint:
            path, info = service.endpoint
            path.write_text(json.dumps(info, indent=2) + "\n")
        try:
            yield
        finally:  # uvicorn's shutdown on SIGINT / SIGTERM: the backend (and a supervised vLLM) goes with it
            if service.endpoint:
                service.endpoint[0].unlink(missing_ok=True)
            await asyncio.to_thread(service.backend.stop) if service.local else await service.backend.stop()

    app = FastAPI(title="rexft serve", lifespan=lifespan)
    app.state.service = service
    app.include_router(api)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
    return app


async def api_error(request: Request, err: APIError):
    return JSONResponse(err.body(), status_code=err.status)


async def http_error(request: Request, err: HTTPException):
    message = "no such endpoint" if err.status_code == 404 else str(err.detail)
    return JSONResponse(error_body(f"{message}: {request.method} {request.url.path}", code=str(err.status_code)),
                        status_code=err.status_code)


async def unexpected(request: Request, err: Exception):
    log.exception("unexpected error serving %s", request.url.path)
    return JSONResponse(error_body(f"internal error: {type(err).__name__}: {err}", "server_error"), status_code=500)
