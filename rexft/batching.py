"""Batching for scoring and generation: left padding, and a task's shared opening run once per batch.

Rows are left-padded with explicit position ids, so each row computes what it would alone. Prompts of one
task usually open with the same instruction; ``prefill_prefixes`` runs each distinct opening once and
gathers its KV cache per row, and ``forward_after`` continues every row from there (padding between a
row's opening and its rest is masked, positions count real tokens only). That is exact only where the
model computes the same for every row of a task on its opening: no per-row prior.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from rexft.adapters import set_token_mask


def _cache_kwarg() -> str:
    """generate()'s name for a prefilled KV cache: `cache` in recent transformers, `past_key_values` before."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", []) else "past_key_values"


CACHE_KWARG = _cache_kwarg()


def left_pad(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, width - len(seq):] = torch.tensor(seq)
        mask[i, width - len(seq):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}


def shared_prefix_lengths(prompts: dict[int, list[int]], groups: dict[int, object]) -> dict[int, int]:
    """Per prompt, how many of its leading tokens every prompt of its group shares (a group is usually a
    task, whose prompts open with the same instruction), leaving it at least its last token; 0 for a prompt
    alone in its group."""
    members: dict[object, list[int]] = {}
    for i in prompts:
        members.setdefault(groups[i], []).append(i)
    lengths = {}
    for index in members.values():
        if len(index) == 1:
            lengths[index[0]] = 0
            continue
        sequences = [prompts[i] for i in index]
        shared = min(len(os.path.commonprefix(sequences)), min(len(s) for s in sequences) - 1)
        lengths.update((i, shared) for i in index)
    return lengths


def shared_prefix_order(sizes: dict[int, int], groups: dict[int, object], shared: dict[int, int]) -> list[int]:
    """Indices in batching order: the rows of a group that shares an opening together (those groups first,
    the one with the longest row first), rows by the tokens after their opening; then the rest by size."""
    longest: dict[object, int] = {}
    for i, n in sizes.items():
        longest[groups[i]] = max(longest.get(groups[i], 0), n)
    return sorted(sizes, key=lambda i: (shared[i] == 0, -longest[groups[i]] if shared[i] else -sizes[i],
                                        str(groups[i]), -(sizes[i] - shared[i])))


def batch_openings(index: list[int], prompts, shared: dict[int, int]) -> list[int]:
    """The opening each row of a batch runs through ``prefill_prefixes`` (0 for all: the batch runs whole
    prompts). A row of its own in a batch that shares openings gives only its first token."""
    lengths = [shared.get(i, 0) for i in index]
    if any(lengths) and all(len(prompts[i]) > 1 for i in index):
        return [n or 1 for n in lengths]
    return [0] * len(index)


def _select_rows(cache, index: torch.Tensor) -> None:
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(index)
    else:  # transformers 5: per layer
        for layer in cache.layers:
            layer.batch_select_indices(index)


@dataclass
class Prefix:
    """Each row's prefix, every distinct prefix run once: its tokens and mask (b, P), gathered per row, and
    the KV cache of the rows' prefixes. ``which[r]``: row r's distinct prefix."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cache: object
    which: list[int]


def prefill_prefixes(model, prefixes: list[list[int]], pad_id: int, before=None) -> Prefix:
    """One forward over the distinct prefixes (left-padded), then the cache gathered to one row per prefix
    use. ``before(rows)`` is called with the first row using each distinct prefix (to set per-row state)."""
    device = next(model.parameters()).device
    distinct: dict[tuple, int] = {}
    which = [distinct.setdefault(tuple(p), len(distinct)) for p in prefixes]
    batch = {k: v.to(device) for k, v in left_pad([list(p) for p in distinct], pad_id).items()}
    if before is not None:
        before([which.index(d) for d in range(len(distinct))])
    set_token_mask(model, batch["attention_mask"])
    cache = model(**batch, use_cache=True, logits_to_keep=1)[CACHE_KWARG]
    index = torch.tensor(which, device=device)
    _select_rows(cache, index)
    return Prefix(batch["input_ids"][index], batch["attention_mask"][index], cache, which)


def split_at_openings(model, sequences: list[list[int]], openings: list[int], pad_id: int,
                      before=None) -> tuple[Prefix | None, dict[str, torch.Tensor]]:
    """Each row split at its opening (``batch_openings``): the distinct openings prefilled (None when no row
    has one), and every row's rest left-padded on the model's device (input_ids, attention_mask), ready
    for ``forward_after``."""
    prefix = None
    if any(openings):
        prefix = prefill_prefixes(model, [s[:n] for s, n in zip(sequences, openings)], pad_id, before)
    rest = left_pad([s[n:] for s, n in zip(sequences, openings)], pad_id)
    device = next(model.parameters()).device
    return prefix, {"input_ids": rest["input_ids"].to(device), "attention_mask": rest["attention_mask"].to(device)}


def forward_after(model, prefix: Prefix | None, batch: dict[str, torch.Tensor], keep: int):
    """The model over ``batch`` (input_ids, attention_mask: the tokens after each row's prefix), continuing
    ``prefix``'s cache (which it extends) with positions counted over the real tokens before."""
    mask = batch["attention_mask"] if prefix is None else torch.cat([prefix.attention_mask, batch["attention_mask"]], 1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -batch["input_ids"].shape[1]:]
    set_token_mask(model, batch["attention_mask"])
    return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True,
                 logits_to_keep=keep, **({} if prefix is None else {CACHE_KWARG: prefix.cache}))


def last_logprobs(model, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
    """log-softmax of the logits at the last ``keep`` positions: (b, keep, V), float32."""
    try:
        logits = model(**batch, logits_to_keep=keep, use_cache=False).logits
    except TypeError:  # models without logits_to_keep
        logits = model(**batch, use_cache=False).logits
    return logits[:, -keep:].float().log_softmax(-1)
