"""The local backend: rexft's own engine serves the exact dynamic mixture, each request with its own prior.

One worker thread owns the model. Requests queue; the worker starts a decoding run with the oldest and the
requests behind it that sample the same way (temperature, top_p, stop strings; a request with a ``seed`` runs
alone, so its seed means the same thing every time), and requests that arrive while it decodes join the
running batch every few tokens, as rows join the pooled engine's decoding batch (``rexft.inference.Feed``),
until one that samples otherwise is waiting (it runs next: first come, first served). Each row stops at its own
``max_tokens``; a stream receives its new text after every chunk of tokens; a client that goes away has its
row dropped at the next chunk. Each row's adapter state is its request's prior (the embedding's
similarities to the run's centroids, as at training), set through the engine's per-row hook (``RowState``).
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
from rexft.inference import Feed, PoolEngine, Row, RowState, Sampling, cut_at_stops, device_profile, new_text

log = logging.getLogger(__name__)


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
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int = 0
    sent: str = ""  # text handed out so far (streams)
    cancelled: bool = False

    @property
    def key(self) -> tuple:
        """Requests with equal keys decode in one batch; a seeded one only with itself."""
        sampling = (0.0, 1.0) if self.temperature == 0 else (self.temperature, self.top_p)
        return sampling + (self.stops, None if self.seed is None else ("seed", self.id))

    def emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class LocalBackend:
    """``serve.backend=local``: see the module docstring. ``submit`` is thread-safe; events per job are
    ("delta", text) while it decodes (streams), then ("done", text, finish_reason, tokens) or ("error", message)."""

    def __init__(self, model, tokenizer, max_batch: int, max_tokens: int, profile: dict | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_tokens = max_batch, max_tokens
        self.profile = device_profile(next(model.parameters()).device, profile)
        self.pending: deque[Job] = deque()
        self.ready = threading.Condition()
        self.ids = itertools.count()
        self.stopped = False
        self.running: dict[int, Job] = {}  # the jobs of the decoding run under way, by id
        self.thread = threading.Thread(target=self._work, name="rexft-local-backend", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------------- the HTTP side
    def submit(self, job: Job) -> Job:
        with self.ready:
            job.id = next(self.ids)
            self.pending.append(job)
            self.ready.notify()
        return job

    def stop(self) -> None:
        with self.ready:
            self.stopped = True
            self.ready.notify()
        self.thread.join(timeout=30)

    # ------------------------------------------------------------------------------ the worker side
    def _work(self) -> None:
        while True:
            with self.ready:
                while not self.pending and not self.stopped:
                    self.ready.wait()
                if self.stopped:
                    return
                first = self.pending.popleft()
            try:
                self._decode(first)
            except Exception as err:  # a failed run answers its requests with 500s; the worker goes on
                log.exception("local backend: decoding failed")
                for job in self.running.values():
                    job.emit("error", f"generation failed: {type(err).__name__}: {err}")
            self.running = {}

    def _take(self, key: tuple, room: int) -> list[Job]:
        """Waiting jobs that decode like ``key``, oldest first, at most ``room``, and none that arrived after a
        job that decodes otherwise (first come, first served: that job's run starts when this one ends)."""
        taken = []
        with self.ready:
            while self.pending and self.pending[0].key == key and len(taken) < room:
                taken.append(self.pending.popleft())
        return taken

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
        feed = Feed(arrivals=lambda: admit(self._take(first.key, self.max_batch)),
                    limit=lambda i: 0 if self.running[i].cancelled else self.running[i].limit,
                    partial=lambda i, tokens: self._partial(self.running[i], tokens))
        engine = PoolEngine(self.model, self.tokenizer, RowState(set_rows, "row"), batch_size=self.max_batch,
                            profile=self.profile, feed=feed)
        sampled = first.temperature > 0
        sampling = Sampling(max_new_tokens=self.max_tokens, do_sample=sampled, temperature=first.temperature if sampled else 1.0,
                            top_p=first.top_p, stop=tuple(first.stops), decode_batch_size=self.max_batch)
        if first.seed is not None:
            torch.manual_seed(first.seed)
        for out in engine.generate(rows, sampling):
            job = self.running.pop(out.id)
            text, finish = self.finish(out.tokens, job)
            job.emit("done", text, finish, len(out.tokens[: job.limit]))

    def _partial(self, job: Job, tokens: list[int]) -> None:
        """A stream's new text: decoded so far, held back where a stop string or a multi-byte character may
        still be forming."""
        text = new_text(self.tokenizer, tokens, job.stops)
        hold = max((len(s) - 1 for s in job.stops), default=0)
        text = text[: len(text) - hold] if hold else text
        text = text.rstrip("\ufffd")
        if len(text) > len(job.sent) and text.startswith(job.sent):
            job.emit("delta", text[len(job.sent):])
            job.sent = text

    def finish(self, tokens: list[int], job: Job) -> tuple[str, str]:
        """The row's text and OpenAI's finish_reason: "stop" (EOS or a stop string) or "length"."""
        tokens = tokens[: job.limit]
        whole = new_text(self.tokenizer, tokens, ())
        eos = self.tokenizer.eos_token_id
        stopped = (eos is not None and eos in tokens) or any(s in whole for s in job.stops)
        return cut_at_stops(whole, job.stops), "stop" if stopped or len(tokens) < job.limit else "length"
