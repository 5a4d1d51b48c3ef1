"""Shared openings: the tokens a group's prompts open with (a task's instruction), run once.

Rows are left-padded with explicit position ids, so each row computes what it would alone.
``prefill_prefixes`` runs each distinct opening once, and ``forward_after`` continues any rows from there
(padding between a row's opening and its rest is masked, positions count real tokens only). That is exact
only where the model computes the same for every row of a group on its opening: no per-row prior. Where
no per-row state differs between groups either, the head all the openings share (a chat template's system
turn) runs once and every opening continues from it.

Rows of different lengths run in runs of similar length (``length_runs``): a forward has a fixed cost
(every weight is read once; the profile's ``run_cost``), so the runs minimise padded tokens plus that cost.

``prefix_passes`` is the public walk for a stage that wants every prompt's forward with openings shared
(merge-export's routes): it yields each forward's rows and output.
"""

from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from rexft.adapters import set_token_mask
from rexft.inference.engine import left_pad
from rexft.inference.profile import DeviceProfile, device_profile


def cache_kwarg(model) -> str:
    """The forward's name for a KV cache: ``cache`` in transformers 5, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def stackable(cache) -> bool:
    """Whether every layer of ``cache`` is a plain dynamic layer (keys, values (b, heads, t, d)), whose rows
    can be stacked and left-padded into a new cache (not sliding-window or quantised layers)."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def cache_of(tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A dynamic cache holding these (keys, values) per layer."""
    return DynamicCache(ddp_cache_data=tensors)


def select_rows(cache, index: torch.Tensor):
    """The rows ``index`` of a cache, as a new cache (the original is left as it is)."""
    if stackable(cache):
        return cache_of([(layer.keys[index], layer.values[index]) for layer in cache.layers])
    taken = copy.deepcopy(cache)
    taken.batch_select_indices(index)
    return taken


def shared_prefix_lengths(prompts: dict[int, list[int]], groups: dict[int, object]) -> dict[int, int]:
    """Per prompt, how many of its leading tokens every prompt of its group shares, leaving it at least its
    last token; 0 for a prompt alone in its group."""
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


def cheapest_split(widths: list[int], fixed: float) -> list[tuple[int, int]]:
    """Contiguous groups [a, b) of items, each group costing ``fixed`` plus its items times its widest item:
    the split with the least total cost (dynamic programming, O(n^2))."""
    n = len(widths)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for b in range(1, n + 1):
        widest = 0
        for a in range(b - 1, -1, -1):
            widest = max(widest, widths[a])
            cost = best[a] + fixed + (b - a) * widest
            if cost < best[b]:
                best[b], cut[b] = cost, a
    groups, b = [], n
    while b:
        groups.append((cut[b], b))
        b = cut[b]
    return groups[::-1]


def length_runs(sizes: list[int], run_cost: int) -> list[list[int]]:
    """Positions grouped into runs of similar size, longest first, each run one forward of its rows
    left-padded to its longest: the runs that minimise padded tokens plus ``run_cost`` per forward."""
    order = sorted(range(len(sizes)), key=lambda r: -sizes[r])
    return [order[a:b] for a, b in cheapest_split([sizes[r] for r in order], run_cost)]


@dataclass
class Prefix:
    """Rows' prefixes: tokens and mask (b, P), left-padded, and their KV cache."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cache: object


@dataclass
class Openings:
    """Distinct openings, each run once (in runs of similar length: ``parts``, each a Prefix), and
    ``which[r]``: the (part, row) holding the opening of row r of the batch."""

    parts: list[Prefix]
    which: list[tuple[int, int]]

    def rows(self, positions) -> Prefix:
        """The prefixes of the batch's rows at ``positions``, left-padded to the longest (a new cache: the
        openings stay reusable)."""
        chosen = [self.which[p] for p in positions]
        if len({part for part, _ in chosen}) == 1:
            part = self.parts[chosen[0][0]]
            index = torch.tensor([row for _, row in chosen], device=part.input_ids.device)
            return Prefix(part.input_ids[index], part.attention_mask[index], select_rows(part.cache, index))
        width = max(self.parts[part].input_ids.shape[1] for part, _ in chosen)
        ids = self.parts[0].input_ids.new_zeros(len(chosen), width)
        mask = torch.zeros_like(ids)
        tensors = [tuple(t.new_zeros(len(chosen), t.shape[1], width, t.shape[3]) for t in (layer.keys, layer.values))
                   for layer in self.parts[0].cache.layers]
        for number, part in enumerate(self.parts):
            out = [k for k, (q, _) in enumerate(chosen) if q == number]
            if not out:
                continue
            at = torch.tensor(out, device=ids.device)
            index = torch.tensor([chosen[k][1] for k in out], device=ids.device)
            offset = width - part.input_ids.shape[1]
            ids[at, offset:], mask[at, offset:] = part.input_ids[index], part.attention_mask[index]
            for (keys, values), layer in zip(tensors, part.cache.layers):
                keys[at, :, offset:], values[at, :, offset:] = layer.keys[index], layer.values[index]
        return Prefix(ids, mask, cache_of(tensors))


def forward_after(model, prefix: Prefix | None, batch: dict[str, torch.Tensor], keep: int):
    """The model over ``batch`` (input_ids, attention_mask: the tokens after each row's prefix), continuing
    ``prefix``'s cache (which it extends) with positions counted over the real tokens before. Returns the
    output and the cache it filled."""
    mask = batch["attention_mask"] if prefix is None else torch.cat([prefix.attention_mask, batch["attention_mask"]], 1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -batch["input_ids"].shape[1]:]
    cache = DynamicCache(config=model.config) if prefix is None else prefix.cache
    set_token_mask(model, batch["attention_mask"])
    out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=keep, **{cache_kwarg(model): cache})
    return out, cache


def prefill_prefixes(model, prefixes: list[list[int]], pad_id: int, before=None, split: bool = False,
                     heads: dict | None = None, profile: DeviceProfile | None = None) -> Openings:
    """The distinct prefixes run once, left-padded: in one forward, or with ``split`` in runs of similar
    length (``length_runs``; where the cache's rows can be stacked again). ``before(rows)`` is called with
    the first row using each distinct prefix of a forward (to set per-row state). With ``split`` and no
    per-row state, the head every distinct prefix opens with (a chat template's system turn) runs once
    first, where that saves more than a forward costs (``run_cost``), and each run continues from it;
    ``heads`` (by their tokens) keeps the heads run for the next calls, which start from them."""
    device = next(model.parameters()).device
    profile = profile or device_profile(device)
    distinct: dict[tuple, int] = {}
    first = [distinct.setdefault(tuple(p), len(distinct)) for p in prefixes]
    keys = list(distinct)
    head = (_common_head(model, keys, pad_id, {} if heads is None else heads, profile.run_cost)
            if split and before is None else None)
    skip = 0 if head is None else head.parts[0].input_ids.shape[1]
    runs = length_runs([len(k) for k in keys], profile.run_cost) if split else [list(range(len(keys)))]
    parts, where = [], {}
    for number, run in enumerate(runs):
        batch = {k: v.to(device) for k, v in left_pad([list(keys[d][skip:]) for d in run], pad_id).items()}
        if before is not None:
            before([first.index(d) for d in run])
        prefix = None if head is None else head.rows([0] * len(run))  # each row continues its copy of the head
        cache = forward_after(model, prefix, batch, 1)[1]
        if prefix is not None:
            batch = {k: torch.cat([getattr(prefix, k), batch[k]], 1) for k in ("input_ids", "attention_mask")}
        if len(runs) > 1 and not stackable(cache):  # rows of this cache cannot be stacked: one forward
            return prefill_prefixes(model, prefixes, pad_id, before, profile=profile)
        parts.append(Prefix(batch["input_ids"], batch["attention_mask"], cache))
        where.update((d, (number, row)) for row, d in enumerate(run))
    return Openings(parts, [where[d] for d in first])


def _common_head(model, keys: list[tuple], pad_id: int, heads: dict, run_cost: int) -> Openings | None:
    """The tokens every one of ``keys`` opens with (leaving each at least one token), run once as one row
    (or taken from ``heads``, which keeps it), when running them once instead of per key saves more than a
    forward's fixed cost; else None."""
    length = min(len(os.path.commonprefix(keys)), min(map(len, keys)) - 1) if len(keys) > 1 else 0
    if (len(keys) - 1) * length <= run_cost:
        return None
    tokens = keys[0][:length]
    if tokens not in heads:
        head = prefill_prefixes(model, [list(tokens)], pad_id)
        heads[tokens] = head if stackable(head.parts[0].cache) else None
    return heads[tokens]


def forward_rests(model, sequences: list[list[int]], lengths: list[int], openings: Openings | None, pad_id: int,
                  keep: int, before_run=None, profile: DeviceProfile | None = None):
    """Every row's tokens after its opening (``lengths``; 0: the whole row), in runs of similar length
    (``length_runs``), each run continuing its rows' prefilled ``openings`` (None: no row has one). Yields
    (run, output) per run; ``before_run(run)`` is called before each run's forward (per-row state)."""
    device = next(model.parameters()).device
    run_cost = (profile or device_profile(device)).run_cost
    for run in length_runs([len(s) - n for s, n in zip(sequences, lengths)], run_cost):
        if before_run is not None:
            before_run(run)
        rest = left_pad([sequences[r][lengths[r]:] for r in run], pad_id)
        rest = {k: rest[k].to(device) for k in ("input_ids", "attention_mask")}
        yield run, forward_after(model, openings and openings.rows(run), rest, keep)[0]


# ------------------------------------------------------------------------------ the public walk for stages
@dataclass
class PrefixPass:
    """One forward of ``prefix_passes``. The openings' forward of a batch: ``run`` is None and
    ``opening_rows[r]`` is the row of that forward holding batch row r's opening (``output`` None). A
    forward of rests: ``run`` holds the batch positions of its rows, ``output`` the model's output (logits
    of the last position). ``batch``: the batch's prompt indices; ``lengths``: each batch row's opening
    (0: it runs whole)."""

    batch: list[int]
    lengths: list[int]
    run: list[int] | None
    opening_rows: list[int] | None
    output: object


def prefix_passes(model, prompts: list[list[int]], pad_id: int, batch_size: int, groups: list | None = None,
                  before_run: Callable[[list[int]], None] | None = None,
                  profile: DeviceProfile | None = None) -> Iterator[PrefixPass]:
    """Every prompt through the model once, ``batch_size`` at a time: with ``groups`` (each prompt's group)
    and no per-row state (``before_run`` None), the opening a group's prompts share is run once per batch
    first; then every row's rest in runs of similar length. ``before_run(prompt indices)`` is called before
    each forward of rests."""
    shared = {}
    if groups is not None and before_run is None:
        shared = shared_prefix_lengths(dict(enumerate(prompts)), dict(enumerate(groups)))
    sizes = {i: len(p) for i, p in enumerate(prompts)}
    order = shared_prefix_order(sizes, dict(enumerate(groups)), shared) if shared else sorted(sizes, key=lambda i: -sizes[i])
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        lengths = batch_openings(index, prompts, shared)
        openings = None
        if any(lengths):
            openings = prefill_prefixes(model, [prompts[i][:n] for i, n in zip(index, lengths)], pad_id, profile=profile)
            yield PrefixPass(index, lengths, None, [row for _, row in openings.which], None)
        set_rows = None if before_run is None else (lambda run: before_run([index[r] for r in run]))
        for run, output in forward_rests(model, [prompts[i] for i in index], lengths, openings, pad_id, 1, set_rows, profile):
            yield PrefixPass(index, lengths, run, None, output)
