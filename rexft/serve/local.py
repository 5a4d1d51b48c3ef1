"""The local backend: rexft's own engine serves the exact dynamic mixture, each request with its own prior.

One worker thread owns the model. Requests queue; the worker starts a decoding run with the oldest and the
requests behind it that sample the same way (temperature, top_p, stop strings; a request with a ``seed`` runs
alone, so its seed means the same thing every time), and requests that arrive while it decodes join the
running batch every few tokens, as rows join the pooled engine's decoding batch (``rexft.inference.Feed``),
until one that samples otherwise is waiting (it runs next: first come, first served). Each row stops at its own
``max_tokens``; a stream receives its new text after every chunk of tokens; a client that goes away has its
row dropped at the next chunk. That is the pooled engine, the CPU default (``serve.engine``); off the CPU
the default is the plain engine (transformers' generate(): the pool's trade-offs are measured on CPUs
only), where a run decodes the requests waiting when it starts, later ones wait for the next run, each row
ends at its own ``max_tokens`` or when its client goes away (the run ends once every row has), and a stream
receives its text when its run ends (for GPU serving at scale: ``serve.backend=vllm``). Each row's adapter state is its request's prior (the embedding's
similarities to the run's centroids, as at training), set through the engine's per-row hook (``RowState``).

Failures stay with their row: a row whose text cannot be decoded or cut at its stops gets its own error
and leaves the batch; when the engine itself fails, the rows it held that had not streamed yet run again,
each alone, so only the row that fails alone is answered with the error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from rexft.adapters import set_prior
from rexft.inference import (Feed, PlainEngine, PoolEngine, Row, RowState, Sampling, TextStream, cut_at_stops, device_profile,
                              new_text)

from rexft.serve.backend import Call, Failed, Finished, TextDelta
from rexft.serve.protocol import APIError

log = logging.getLogger(__name__)
SAMPLING_EPS = 1e-5  # temperatures below this decode greedily, as vLLM's do (logits divided by less overflow)
# The request fields the local backend implements; any other field set to a value but its default is refused.
LOCAL_FIELDS = frozenset({"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                          "stop", "seed", "stream", "stream_options", "user"})


@dataclass
class Job:
    """One request inside the worker: its prompt tokens, prior, sampling and where its events go."""

    tokens: list[int]
    prior: torch.Tensor | None
    limit: int  # max new tokens
    temperature: float
    top_p: float
    stops: tuple[str, ...]
    seed: int | None
    loop: asyncio.AbstractEventLoop
    stream: bool = False  # its text is handed out as it decodes (TextDelta events)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int = 0
    sent: str = ""  # text handed out so far (streams)
    reader: TextStream | None = None  # a stream's text as it decodes
    cancelled: bool = False  # its client went away
    answered: bool = False  # its last event (Finished or Failed) is out
    alone: bool = False  # decodes in a run of its own (after a run that held it failed)

    @classmethod
    def of(cls, call: Call, loop: asyncio.AbstractEventLoop) -> "Job":
        r = call.request
        return cls(call.prompt_ids, call.prior, call.max_tokens, r.temperature, r.top_p, r.stops, r.seed, loop, r.stream)

    @property
    def sampled(self) -> bool:
        return self.temperature >= SAMPLING_EPS

    @property
    def key(self) -> tuple:
        """Requests with equal keys decode in one batch; a seeded one (or one running alone) only with itself."""
        sampling = (self.temperature, self.top_p) if self.sampled else (0.0, 1.0)
        return sampling + (self.stops, None if self.seed is None and not self.alone else ("alone", self.id))

    @property
    def done(self) -> bool:
        return self.cancelled or self.answered

    def emit(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # its event loop closed: nobody is waiting
            pass

    def answer(self, event: Finished | Failed) -> None:
        """The job's last event, once."""
        if not self.answered:
            self.answered = True
            self.emit(event)


class LocalBackend:
    """``serve.backend=local``: see the module docstring. ``answer`` yields a call's TextDelta events while
    it decodes (streams), then its Finished or Failed."""

    name = "local"

    def __init__(self, model, tokenizer, max_batch: int, max_tokens: int, profile: dict | None = None,
                 engine: str = "auto"):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_tokens = max_batch, max_tokens
        device = next(model.parameters()).device
        self.profile = device_profile(device, profile)
        self.pooled = engine == "pool" or engine == "auto" and device.type == "cpu"  # rows join while it decodes
        self.pending: deque[Job] = deque()
        self.ready = threading.Condition()
        self.ids = itertools.count()
        self.stopped = False
        self.running: dict[int, Job] = {}  # the jobs of the decoding run under way, by id
        self.thread = threading.Thread(target=self._work, name="rexft-local-backend", daemon=True)

    # ------------------------------------------------------------------------------- the HTTP side
    async def start(self) -> None:
        self.thread.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self._stop)

    def unavailable(self) -> str | None:
        return None if self.thread.is_alive() and not self.stopped else "the local backend's worker is not running"

    def refuse(self, request) -> None:
        """The first field set to something the local backend does not implement (n > 1, logprobs, tools...)."""
        fields = type(request).model_fields
        for name, value in request.model_dump(exclude_unset=True).items():
            default = fields[name].default if name in fields else None
            if name not in LOCAL_FIELDS and value is not None and value != default:
                raise APIError(400, f"'{name}' is not supported by the local backend (serve.backend=vllm takes it)",
                               param=name, code="unsupported_parameter")

    async def answer(self, call: Call):
        reason = self.unavailable()
        if reason is not None:
            yield Failed(APIError(503, reason, code="engine_unavailable", kind="server_error"))
            return
        job = self.submit(Job.of(call, asyncio.get_running_loop()))
        try:
            while not isinstance(event := await job.events.get(), (Finished, Failed)):
                yield event
            yield event
        finally:  # a client gone before its answer: its row leaves the decoding batch at the next chunk
            job.cancelled = True

    def submit(self, job: Job) -> Job:
        with self.ready:
            job.id = next(self.ids)
            self.pending.append(job)
            self.ready.notify()
        return job

    def _stop(self) -> None:
        with self.ready:
            self.stopped = True
            self.ready.notify()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        with self.ready:
            while self.pending:
                self.pending.popleft().answer(Failed(APIError(503, "the server is shutting down",
                                                              code="engine_unavailable", kind="server_error")))

    # ------------------------------------------------------------------------------ the worker side
    def _work(self) -> None:
        while (first := self._next()) is not None:
            try:
                self._decode(first)
            except Exception as err:  # the engine failed: its rows run again alone, or fail with the reason
                log.exception("local backend: decoding failed")
                self._retry_alone(err)
            finally:
                for job in self.running.values():  # every job taken gets an answer, whatever happened
                    job.answer(Failed(APIError(500, "generation ended without an answer", kind="server_error")))
                self.running = {}

    def _next(self) -> Job | None:
        """The oldest waiting job whose client is still there (None once the backend stops)."""
        with self.ready:
            while not self.stopped:
                while self.pending and self.pending[0].cancelled:
                    self.pending.popleft()
                if self.pending:
                    return self.pending.popleft()
                self.ready.wait()
        return None

    def _take(self, key: tuple, room: int) -> list[Job]:
        """Waiting jobs that decode like ``key``, oldest first, at most ``room``, and none that arrived after a
        job that decodes otherwise (first come, first served: that job's run starts when this one ends)."""
        taken = []
        with self.ready:
            while self.pending and self.pending[0].key == key and len(taken) < room:
                taken.append(self.pending.popleft())
        return [job for job in taken if not job.cancelled]

    def _retry_alone(self, err: Exception) -> None:
        """After the engine failed: the run's unanswered rows that streamed nothing yet wait at the head of
        the queue to decode each alone; a row that already ran alone, or streamed, gets the error."""
        again = []
        for job in self.running.values():
            if job.alone or job.sent or job.done:
                job.answer(Failed(APIError(500, f"generation failed: {type(err).__name__}: {err}", kind="server_error")))
            else:
                job.alone = True
                again.append(job)
        self.running = {}
        with self.ready:
            self.pending.extendleft(reversed(again))

    def _decode(self, first: Job) -> None:
        """One decoding run: ``first`` and the jobs that decode like it, now and as they arrive."""
        priors: dict[int, torch.Tensor] = {}
        device = next(self.model.parameters()).device

        def admit(jobs: list[Job]) -> list[list[Row]]:
            for job in jobs:
                self.running[job.id] = job
                if job.prior is not None:
                    priors[job.id] = job.prior
            return [[Row(job.id, job.tokens, job.id) for job in jobs]] if jobs else []  # prefilled together, then they join

        def set_rows(ids: list[int]) -> None:
            set_prior(self.model, torch.stack([priors[i] for i in ids]).to(device) if priors else None)

        (rows,) = admit([first] + self._take(first.key, self.max_batch - 1))
        limit = lambda i: 0 if self.running[i].done else self.running[i].limit  # noqa: E731  (0: its client went away)
        if self.pooled:
            feed = Feed(arrivals=lambda: admit(self._take(first.key, self.max_batch)), limit=limit,
                        partial=lambda i, tokens: self._partial(self.running[i], tokens))
            engine = PoolEngine(self.model, self.tokenizer, RowState(set_rows, "row"), batch_size=self.max_batch,
                                profile=self.profile, feed=feed)
            most = self.max_tokens  # each row stops at its own limit (the feed's)
        else:  # these rows alone, each ending at its own limit (or its client gone); answered when all have
            feed = Feed(arrivals=lambda: [], limit=limit, partial=lambda i, tokens: None)
            engine = PlainEngine(self.model, self.tokenizer, RowState(set_rows, "row"), batch_size=self.max_batch,
                                 feed=feed)
            most = max(job.limit for job in self.running.values())
        sampling = Sampling(max_new_tokens=most, do_sample=first.sampled,
                            temperature=first.temperature if first.sampled else 1.0, top_p=first.top_p,
                            stop=tuple(first.stops), decode_batch_size=self.max_batch)
        if first.seed is not None:
            torch.manual_seed(first.seed)
        for out in engine.generate(rows, sampling):
            job = self.running.pop(out.id)
            try:
                text, finish = self.finish(out.tokens, job)
            except Exception as err:
                self._fail(job, err)
                continue
            job.answer(Finished(text, finish, len(out.tokens[: job.limit])))

    def _fail(self, job: Job, err: Exception) -> None:
        """One row's text could not be made: that request's error; the row leaves at the next chunk."""
        log.exception("local backend: request %d failed", job.id, exc_info=err)
        job.answer(Failed(APIError(500, f"generating this request's text failed: {type(err).__name__}: {err}",
                                   kind="server_error")))

    def _partial(self, job: Job, tokens: list[int]) -> None:
        """A stream's new text: decoded incrementally (``TextStream``), held back where a stop string or a
        multi-byte character may still be forming."""
        if job.done or not job.stream:
            return
        job.reader = job.reader or TextStream(self.tokenizer, job.stops)
        try:
            text = job.reader.safe(tokens)
        except Exception as err:
            self._fail(job, err)
            return
        if len(text) > len(job.sent) and text.startswith(job.sent):
            job.emit(TextDelta(text[len(job.sent):]))
            job.sent = text

    def finish(self, tokens: list[int], job: Job) -> tuple[str, str]:
        """The row's text and OpenAI's finish_reason: "stop" (EOS or a stop string) or "length"."""
        tokens = tokens[: job.limit]
        whole = new_text(self.tokenizer, tokens, ())
        eos = self.tokenizer.eos_token_id
        stopped = (eos is not None and eos in tokens) or any(s in whole for s in job.stops)
        return cut_at_stops(whole, job.stops), "stop" if stopped or len(tokens) < job.limit else "length"
