"""What the endpoints ask of a backend (local, vllm): one ``Call`` in, typed events out (``Backend``).

    TextDelta   a stream's new text                                           (local)
    Finished    the whole text, OpenAI's finish_reason, the completion's tokens (local)
    Relayed     a response or stream chunk as the engine wrote it             (vllm)
    Failed      this request could not be answered: the error its client gets (both)

A backend answers every call with a finite sequence that ends in Finished, Failed or the last Relayed; one
call's failure is that call's Failed, never another call's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Protocol, Union

from rexft.serve.protocol import APIError, ChatRequest, GenerationRequest, Relayed
from rexft.serve.router import Route

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Call:
    """One request as a backend takes it: the validated body, its route, its prior (the local backend's
    adapter state; None without one), its prompt's token ids and the completion's token limit (checked
    against the server's limits and the context)."""

    request: GenerationRequest
    route: Route
    prior: "torch.Tensor | None"
    prompt_ids: list[int]
    max_tokens: int

    @property
    def chat(self) -> bool:
        return isinstance(self.request, ChatRequest)


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: APIError


Event = Union[TextDelta, Finished, Relayed, Failed]


class Backend(Protocol):
    """A backend of ``rexft serve``: ``LocalBackend`` (rexft.serve.local) or ``VllmBackend`` (rexft.serve.vllm)."""

    name: str  # "local" | "vllm", as /health reports it

    async def start(self) -> None:
        """Ready to answer (the app's start-up)."""

    async def stop(self) -> None:
        """Every call answered or failed, every resource released (the app's shutdown)."""

    def unavailable(self) -> str | None:
        """Why it cannot answer now (/health's 503), None when it can."""

    def refuse(self, request: GenerationRequest) -> None:
        """An APIError naming the first field of ``request`` it does not implement."""

    def answer(self, call: Call) -> AsyncIterator[Event]:
        """The call's events; closing the iterator early gives the call up (a client gone)."""
