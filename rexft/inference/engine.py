"""The engine interface: the few model calls every stage's inference is written in, and the plain engine.

An engine answers three questions about rows (``Row``: an id for the per-row state hook, its tokens, its
group) and knows nothing of metrics:

    next_logprobs(rows)       log-softmax of the next token after each row's prompt, (V,) per row
    score(rows)               per row, sum of log p(target | prompt)
    generate(rows, sampling)  each row's new tokens (greedy, sampled or beams, ``Sampling``), and its
                              target's summed log-probability when it has a target (the target NLL's sum)

``PlainEngine`` batches length-sorted, left-padded rows through the model's forward and transformers'
generate() and cache: the default everywhere but on a CPU. ``rexft.inference.pool.PoolEngine`` (the CPU
default) adds a group's shared opening run once, and rows that join and leave a decoding batch. Both give
the same greedy text and the same scores.

Per-row adapter state (a trex prior, the static export group of merge-export's GroupedLoRA) passes through
one hook, ``RowState``: before every forward, ``set(ids)`` gets the row ids of the forward's rows, in
order. Forwards outside ``route_logs_paused`` (those whose routes a routing heatmap counts) run right after
that call, over exactly those rows: once per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable, Hashable, Iterator, Protocol

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from rexft.adapters import route_logs_paused, set_prior, set_token_mask
from rexft.modeling import pad_id


@dataclass
class Row:
    """One sequence to score or continue. ``id``: what the per-row state hook receives (an example's index);
    ``group``: rows of one group (a task) may share their opening; ``target``: tokens after the prompt whose
    summed log-probability comes back (``score``; ``generate``, teacher-forced)."""

    id: int
    prompt: list[int]
    group: Hashable = None
    target: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Sampling:
    """How ``generate`` decodes: greedy unless ``do_sample``; a row ends at EOS, at a stop string (the text is
    cut before it) or after ``max_new_tokens``."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    stop: tuple[str, ...] = ()
    decode_batch_size: int | None = None  # the pooled engine's rows decoding together (None: its profile's)

    @classmethod
    def of(cls, settings) -> "Sampling":
        """The fields of ``settings`` (an EvalConfig, or any object with some of these attributes)."""
        values = {f.name: getattr(settings, f.name) for f in fields(cls) if hasattr(settings, f.name)}
        return cls(**{**values, "stop": tuple(values.get("stop") or ())})


@dataclass
class Feed:
    """A server's hooks into an engine's ``generate``: rows that arrive while it decodes join the decoding
    batch, each row stops at its own token limit, and each row's tokens so far are handed out after every
    chunk (a stream's deltas). The plain engine takes only ``limit`` (read every step: ``RowLimits``). ``arrivals()`` returns batches of new rows; ``limit(id)`` a row's most new
    tokens (0 ends it at the next chunk: a client gone); ``partial(id, tokens)`` sees an unfinished row's tokens."""

    arrivals: Callable[[], list[list[Row]]]
    limit: Callable[[int], int]
    partial: Callable[[int, list[int]], None]


@dataclass
class RowState:
    """The hook that sets per-row adapter state. ``varies``: None when it is the same for every row,
    "group" when it differs only between groups (tasks), "row" when rows of one group may differ. Rows of a
    group share their opening's KV cache only where it does not vary by row."""

    set: Callable[[list[int]], None]
    varies: str | None = "row"


def prior_state(model, priors: torch.Tensor | None) -> RowState:
    """The hook for a model whose adapters take a prior per example (``priors`` (n, k) by row id), or none
    (None: every row the same)."""
    device = next(model.parameters()).device
    if priors is None:
        return RowState(lambda ids: set_prior(model, None), varies=None)
    return RowState(lambda ids: set_prior(model, priors[ids].to(device)), varies="row")


@dataclass
class Generated:
    """One row's generation: its new tokens (up to EOS or past it: the caller cuts), and the summed
    log-probability of its target under teacher forcing (None without a target)."""

    id: int
    tokens: list[int]
    target_logprob: float | None = None


class Engine(Protocol):
    """What protocols (eval's first_token, loglik, generate; export's fidelity; serve) call."""

    pad_id: int

    def next_logprobs(self, rows: list[Row]) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(row ids, log-softmax of each row's next token (b, V)) per batch."""

    def score(self, rows: dict[Hashable, Row]) -> dict[Hashable, float]:
        """Per key: sum of log p(row.target | row.prompt)."""

    def generate(self, rows: list[Row], sampling: Sampling) -> Iterator[Generated]:
        """Each row's generation, in any order."""


def left_pad(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows left-padded to the longest, with position ids counting real tokens only."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, width - len(seq):] = torch.tensor(seq)
        mask[i, width - len(seq):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}


def summed_logprobs(logits: torch.Tensor, labels: list[list[int]]) -> torch.Tensor:
    """Per row, the summed log-probability of its ``labels`` (b,): ``logits`` (b, t + 1, V) end with the
    positions predicting them, each row's labels ending at t. The one place a target's or an option's
    log-likelihood is computed."""
    b, t = logits.shape[0], logits.shape[1] - 1
    ids = torch.zeros((b, t), dtype=torch.long)
    real = torch.zeros((b, t), dtype=torch.bool)
    for row, tokens in enumerate(labels):
        if tokens:
            ids[row, t - len(tokens):], real[row, t - len(tokens):] = torch.tensor(tokens, dtype=torch.long), True
    real = real.to(logits.device)
    token_nll = torch.nn.functional.cross_entropy(logits[:, :-1][real].float(), ids.to(logits.device)[real], reduction="none")
    return -torch.zeros(b, device=logits.device).index_add_(0, real.nonzero()[:, 0], token_nll)


def generation_config(tokenizer, sampling: Sampling, pad_id: int):
    """transformers' GenerationConfig for ``sampling`` (greedy unless ``do_sample``)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=sampling.do_sample,
                              num_beams=sampling.num_beams, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
    if sampling.do_sample:
        config.temperature, config.top_p = sampling.temperature, sampling.top_p
    else:  # the model's own generation_config may carry sampling defaults: greedy means none of them
        config.temperature, config.top_p, config.top_k = None, None, None
    if sampling.stop:
        config.stop_strings = list(sampling.stop)
    return config


class RowLimits(StoppingCriteria):
    """Ends each row of a generate() batch once it has ``limit(id)`` new tokens, read every step (0: at once,
    a client gone); the batch ends when every row has. Rows ended so are padded after, as at EOS."""

    def __init__(self, ids: list[int], prompt_width: int, limit: Callable[[int], int]):
        self.ids, self.prompt_width, self.limit = ids, prompt_width, limit

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        made = input_ids.shape[1] - self.prompt_width
        return torch.tensor([made >= self.limit(i) for i in self.ids], dtype=torch.bool, device=input_ids.device)


class PlainEngine:
    """Length-sorted, left-padded batches of ``batch_size`` rows through the model's forward and generate()."""

    share_prefixes = False  # every row runs its whole prompt (the pool engine runs a group's opening once)

    def __init__(self, model, tokenizer, rows: RowState | None = None, batch_size: int = 16, progress=None,
                 feed: Feed | None = None):
        self.model, self.tokenizer, self.rows, self.batch_size = model, tokenizer, rows, batch_size
        self.progress = progress or (lambda n: None)  # called with the rows each batch finished
        self.feed = feed

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def pad_id(self) -> int:
        return pad_id(self.tokenizer)

    def _set_rows(self, ids: list[int]) -> None:
        if self.rows is not None:
            self.rows.set(ids)

    def batches(self, sizes: dict, order: list | None = None) -> Iterator[list]:
        """Batches of keys, longest first (``sizes``: key -> tokens), or in ``order``."""
        order = order or sorted(sizes, key=lambda k: -sizes[k])
        for start in range(0, len(order), self.batch_size):
            yield order[start:start + self.batch_size]

    def forward(self, sequences: list[list[int]], ids: list[int], keep: int):
        """The model over left-padded ``sequences`` (rows ``ids``): logits at the last ``keep`` positions."""
        batch = {k: v.to(self.device) for k, v in left_pad(sequences, self.pad_id).items()}
        self._set_rows(ids)
        set_token_mask(self.model, batch["attention_mask"])
        try:
            return self.model(**batch, logits_to_keep=keep, use_cache=False).logits[:, -keep:]
        except TypeError:  # models without logits_to_keep
            return self.model(**batch, use_cache=False).logits[:, -keep:]

    @torch.inference_mode()
    def next_logprobs(self, rows: list[Row]) -> Iterator[tuple[list[int], torch.Tensor]]:
        by_id = {row.id: row for row in rows}
        for ids in self.batches({i: len(r.prompt) for i, r in by_id.items()}):
            yield ids, self.forward([by_id[i].prompt for i in ids], ids, 1)[:, -1].float().log_softmax(-1)
            self.progress(len(ids))

    @torch.inference_mode()
    def score(self, rows: dict[Hashable, Row]) -> dict[Hashable, float]:
        out = {}
        for keys in self.batches({k: len(r.prompt) + len(r.target) for k, r in rows.items()}):
            chunk = [rows[k] for k in keys]
            keep = max(len(r.target) for r in chunk) + 1
            logits = self.forward([r.prompt + r.target for r in chunk], [r.id for r in chunk], keep)
            out.update(zip(keys, summed_logprobs(logits, [r.target for r in chunk]).tolist()))
        return out

    @torch.inference_mode()
    def generate(self, rows: list[Row], sampling: Sampling) -> Iterator[Generated]:
        """Whole prompts through generate(), ``batch_size`` at a time, longest first; then every row's target
        in one teacher-forced pass (which logs the rows' routes)."""
        config = generation_config(self.tokenizer, sampling, self.pad_id)
        by_id = {row.id: row for row in rows}
        texts = {}
        for ids in self.batches({i: len(r.prompt) for i, r in by_id.items()}):
            batch = {k: v.to(self.device) for k, v in left_pad([by_id[i].prompt for i in ids], self.pad_id).items()}
            self._set_rows(ids)
            set_token_mask(self.model, None)
            limits = None
            if self.feed is not None and sampling.num_beams == 1:
                limits = StoppingCriteriaList([RowLimits(ids, batch["input_ids"].shape[1], self.feed.limit)])
            with route_logs_paused(self.model):
                out = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                          generation_config=config, stopping_criteria=limits,
                                          tokenizer=self.tokenizer if sampling.stop else None)
            texts.update(zip(ids, out[:, batch["input_ids"].shape[1]:].tolist()))
            self.progress(len(ids))
        sums = self.score({i: row for i, row in by_id.items() if row.target})
        for i, row in by_id.items():
            yield Generated(i, texts[i], sums.get(i))
