"""Eval engines: the few model calls the protocols are written in, and how rows are batched to make them.

An engine answers three questions about rows (each an example id with its tokens) and knows nothing of metrics:

    next_logprobs(prompts)              log-softmax of the next token after each prompt, (V,) per row
    continuation_logprobs(pairs)        sum of log p(continuation | context) per (context, continuation)
    generate(prompts, targets, config)  each row's new tokens (greedy, sampled or beams), and its target's
                                        summed log-probability when it has a target (the target NLL's sum)

``PlainEngine`` batches length-sorted, left-padded rows through the model's forward and transformers'
generate() and cache: the default on CUDA and every device but the CPU. ``rexft.eval.pool.PoolEngine``
(the CPU default) adds a task's shared opening run once, and rows that join and leave a decoding batch.
Both give the same greedy text and the same scores; ``eval.engine: auto | plain | pool`` picks one.

Per-row adapter state (a trex prior, the static export group of merge-export's GroupedLoRA) passes through
one hook, ``RowState``: before every forward, ``set(ids)`` gets the example ids of the forward's rows, in
order. Forwards outside ``route_logs_paused`` (those whose routes a routing heatmap counts) run right after
that call, over exactly those rows: once per example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from rexft.adapters import route_logs_paused, set_prior, set_token_mask
from rexft.modeling import pad_id


@dataclass
class RowState:
    """The hook that sets per-row adapter state. ``varies``: None when it is the same for every row,
    "group" when it differs only between groups (tasks), "row" when rows of one group may differ. Rows of a
    group share their opening's KV cache only where it does not vary by row."""

    set: Callable[[list[int]], None]
    varies: str | None = "row"


def prior_state(model, priors: torch.Tensor | None) -> RowState:
    """The hook for a model whose adapters take a prior per example (``priors`` (n, k) by example id), or
    none (None: every row the same)."""
    device = next(model.parameters()).device
    if priors is None:
        return RowState(lambda ids: set_prior(model, None), varies=None)
    return RowState(lambda ids: set_prior(model, priors[ids].to(device)), varies="row")


@dataclass
class Generated:
    """One row's generation: its new tokens (up to EOS or past it: the protocol cuts), and the summed
    log-probability of its target under teacher forcing (None without a target)."""

    id: int
    tokens: list[int]
    target_logprob: float | None = None


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


def summed_logprobs(logits: torch.Tensor, labels: list[list[int]], aligned_right: bool = True) -> torch.Tensor:
    """Per row, the summed log-probability of its ``labels`` (b,): ``logits`` (b, t + 1, V) end with the
    positions predicting them, right-aligned (each row's labels end at t) or left-aligned (they start at 0).
    The one place a target's or an option's log-likelihood is computed."""
    b, t = logits.shape[0], logits.shape[1] - 1
    ids = torch.zeros((b, t), dtype=torch.long)
    real = torch.zeros((b, t), dtype=torch.bool)
    for row, tokens in enumerate(labels):
        if tokens:
            at = slice(t - len(tokens), t) if aligned_right else slice(0, len(tokens))
            ids[row, at], real[row, at] = torch.tensor(tokens, dtype=torch.long), True
    real = real.to(logits.device)
    token_nll = torch.nn.functional.cross_entropy(logits[:, :-1][real].float(), ids.to(logits.device)[real], reduction="none")
    return -torch.zeros(b, device=logits.device).index_add_(0, real.nonzero()[:, 0], token_nll)


def generation_config(tokenizer, settings, pad_id: int):
    """transformers' GenerationConfig for eval's settings (greedy unless ``do_sample``)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                              num_beams=settings.num_beams, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
    if settings.do_sample:
        config.temperature, config.top_p = settings.temperature, settings.top_p
    else:  # the model's own generation_config may carry sampling defaults: greedy means none of them
        config.temperature, config.top_p, config.top_k = None, None, None
    if settings.stop:
        config.stop_strings = list(settings.stop)
    return config


class PlainEngine:
    """Length-sorted, left-padded batches of ``batch_size`` rows through the model's forward and generate()."""

    share_prefixes = False  # every row runs its whole prompt (the pool engine runs a task's opening once)

    def __init__(self, model, tokenizer, rows: RowState | None = None, batch_size: int = 16, progress=None):
        self.model, self.tokenizer, self.rows, self.batch_size = model, tokenizer, rows, batch_size
        self.progress = progress or (lambda n: None)  # called with the rows each batch finished

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
        """The model over left-padded ``sequences`` (rows of examples ``ids``): logits at the last ``keep`` positions."""
        batch = {k: v.to(self.device) for k, v in left_pad(sequences, self.pad_id).items()}
        self._set_rows(ids)
        set_token_mask(self.model, batch["attention_mask"])
        try:
            return self.model(**batch, logits_to_keep=keep, use_cache=False).logits[:, -keep:]
        except TypeError:  # models without logits_to_keep
            return self.model(**batch, use_cache=False).logits[:, -keep:]

    @torch.inference_mode()
    def next_logprobs(self, prompts: dict[int, list[int]], groups: dict[int, object]) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(ids, log-softmax of each row's next token (b, V)) per batch."""
        for ids in self.batches({i: len(p) for i, p in prompts.items()}):
            yield ids, self.forward([prompts[i] for i in ids], ids, 1)[:, -1].float().log_softmax(-1)
            self.progress(len(ids))

    @torch.inference_mode()
    def continuation_logprobs(self, pairs: dict[object, tuple[int, list[int], list[int]]]) -> dict[object, float]:
        """Per key of ``pairs`` (example id, context, continuation): sum of log p(continuation | context)."""
        out = {}
        for keys in self.batches({k: len(c) + len(t) for k, (_, c, t) in pairs.items()}):
            chunk = [pairs[k] for k in keys]
            keep = max(len(t) for _, _, t in chunk) + 1
            logits = self.forward([c + t for _, c, t in chunk], [i for i, _, _ in chunk], keep)
            out.update(zip(keys, summed_logprobs(logits, [t for _, _, t in chunk]).tolist()))
        return out

    @torch.inference_mode()
    def generate(self, prompts: dict[int, list[int]], targets: dict[int, list[int]], groups: dict[int, object],
                 config, settings) -> Iterator[Generated]:
        """Whole prompts through generate(), ``batch_size`` at a time, longest first; then every row's target
        in one teacher-forced pass (which logs the rows' routes)."""
        texts = {}
        for ids in self.batches({i: len(p) for i, p in prompts.items()}):
            batch = {k: v.to(self.device) for k, v in left_pad([prompts[i] for i in ids], self.pad_id).items()}
            self._set_rows(ids)
            set_token_mask(self.model, None)
            with route_logs_paused(self.model):
                out = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                          generation_config=config, tokenizer=self.tokenizer if settings.stop else None)
            texts.update(zip(ids, out[:, batch["input_ids"].shape[1]:].tolist()))
            self.progress(len(ids))
        sums = self.continuation_logprobs({i: (i, prompts[i], targets.get(i, [])) for i in prompts})
        for i in prompts:
            yield Generated(i, texts[i], sums[i] if targets.get(i) else None)
