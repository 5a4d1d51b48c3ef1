"""The CPU's eval engine: a task's shared opening run once, and rows that join and leave a decoding batch.

Rows are left-padded with explicit position ids, so each row computes what it would alone. Prompts of one
task usually open with the same instruction; ``prefill_prefixes`` runs each distinct opening once, and
``forward_after`` continues any rows from there (padding between a row's opening and its rest is masked,
positions count real tokens only). That is exact only where the model computes the same for every row of a
task on its opening: no per-row prior. Where no per-row state differs between tasks either, the head all
the openings share (a chat template's system turn) runs once and every opening continues from it.

Rows of different lengths run in runs of similar length (``length_runs``): on a CPU a forward has a fixed
cost (every weight is read once) worth ~50 tokens, so the runs minimise padded tokens plus that cost.

A ``Decoding`` holds rows in the middle of generation as generate() takes them (their tokens so far and the
KV cache of all but each row's last token). ``join`` writes prefilled rows into a decoding batch's free rows
(the narrower left-padded, cache included) and ``keep`` drops finished rows, so a decoding batch is refilled
as rows finish instead of running every batch to its longest row. Both need a cache of plain per-layer
key/value tensors (``poolable``); sliding-window and other caches decode each batch on its own. In such a
batch short rows sit beside long ones: ``rows_sdpa`` has each group of rows attend from its own first real
key (groups planned once per run of decoding steps, on the host), so a decoding step does not read the
batch's widest padding for every row, and ``join`` writes only the padding a step may read (the profile's
``read_margin``; all of it where the model does not attend with ``rows_sdpa``). Prefills on a CPU attend
without copying the key/value heads that grouped-query attention shares (``masked_gqa_sdpa``).

The trade-offs (a forward's fixed cost, an attention call's, the margin, how often rows join) are a
``DeviceProfile`` per device type, not constants; ``eval.profile`` overrides them.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch
from transformers.cache_utils import DynamicLayer

from rexft.adapters import route_logs_paused, set_token_mask
from rexft.eval.engine import Generated, PlainEngine, RowState, left_pad, summed_logprobs


def _cache_kwarg() -> str:
    """generate()'s name for a prefilled KV cache: `cache` in recent transformers, `past_key_values` before."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", []) else "past_key_values"


CACHE_KWARG = _cache_kwarg()


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



GROWTH = 32  # tokens of room a cache layer gains each time it runs out


def _layers(cache) -> list | None:
    """The cache's layers when each is a plain dynamic layer (keys and values (b, heads, t, d)), else None."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) not in (DynamicLayer, GrowingLayer)
                                                 or getattr(layer, "keys", None) is None for layer in layers):
        return None
    return layers


def poolable(cache) -> bool:
    """Whether rows of this cache can be stacked, selected and left-padded (``join``, ``keep``)."""
    return _layers(cache) is not None


class GrowingLayer(DynamicLayer):
    """A dynamic cache layer whose keys and values live in buffers with room to grow, in tokens and in
    rows: a decoding step writes its token in place (DynamicLayer concatenates a copy of the whole cache;
    on a CPU that copy is half of a decoding step at batch 64), rows that leave are dropped by moving the
    rest up (``keep``), and rows that join are written into the free rows (``join``)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: int, length: int):
        """``keys``, ``values``: (row capacity, heads, token capacity, d) buffers whose first ``rows`` rows
        and ``length`` positions hold the cache."""
        super().__init__()
        self._keys, self._values, self.rows, self.length = keys, values, rows, length
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

    keys = property(lambda self: None if self._keys is None else self._keys[: self.rows, :, : self.length],
                    lambda self, value: self._reset("_keys", value))
    values = property(lambda self: None if self._values is None else self._values[: self.rows, :, : self.length],
                      lambda self, value: self._reset("_values", value))

    @property
    def capacity(self) -> int:
        return self._keys.shape[0]

    def _reset(self, name: str, value) -> None:  # DynamicLayer's own methods assign whole tensors
        setattr(self, name, value)
        if value is not None:
            self.rows, self.length = value.shape[0], value.shape[-2]

    def _write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self._keys is None:
            self.rows = keys.shape[0]
        end = self.length + keys.shape[-2]
        if self._keys is None or end > self._keys.shape[-2]:
            rows = self.rows if self._keys is None else self.capacity
            grown = [_buffer(t, rows, end + GROWTH) for t in (keys, values)]
            if self.length:
                grown[0][: self.rows, :, : self.length], grown[1][: self.rows, :, : self.length] = self.keys, self.values
            self._keys, self._values = grown
        self._keys[: self.rows, :, self.length: end], self._values[: self.rows, :, self.length: end] = keys, values
        self.length = end

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self._write(key_states, value_states)
        return self.keys, self.values


def _buffer(t: torch.Tensor, rows: int, tokens: int) -> torch.Tensor:
    """An uninitialised (rows, heads, tokens, d) buffer for keys or values like ``t``."""
    return t.new_empty(rows, t.shape[1], tokens, t.shape[3])


def _with_tensors(cache, tensors: list[tuple[torch.Tensor, torch.Tensor]]):
    """A new cache object like ``cache`` holding these (keys, values) per layer."""
    fresh = copy.copy(cache)
    fresh.layers = [copy.copy(layer) for layer in cache.layers]
    for layer, (keys, values) in zip(fresh.layers, tensors):
        layer.keys, layer.values = keys, values
    return fresh


def _take(cache, index: torch.Tensor):
    """The rows ``index`` of a cache, as a new cache (the original is left as it is)."""
    if _layers(cache) is not None:
        return _with_tensors(cache, [(layer.keys[index], layer.values[index]) for layer in cache.layers])
    taken = copy.deepcopy(cache)
    if hasattr(taken, "batch_select_indices"):
        taken.batch_select_indices(index)
    else:  # transformers 5: per layer
        for layer in taken.layers:
            layer.batch_select_indices(index)
    return taken


@dataclass
class Prefix:
    """Rows' prefixes: tokens and mask (b, P), left-padded, and their KV cache."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cache: object


@dataclass
class Openings:
    """Distinct openings, each run once (in runs of similar length: ``parts``, each its tokens, mask and KV
    cache), and ``which[r]``: the (part, row) holding the opening of row r of the batch."""

    parts: list[tuple[torch.Tensor, torch.Tensor, object]]
    which: list[tuple[int, int]]

    def rows(self, positions) -> Prefix:
        """The prefixes of the batch's rows at ``positions``, left-padded to the longest (a new cache: the
        openings stay reusable)."""
        chosen = [self.which[p] for p in positions]
        if len({part for part, _ in chosen}) == 1:
            ids, mask, cache = self.parts[chosen[0][0]]
            index = torch.tensor([row for _, row in chosen], device=ids.device)
            return Prefix(ids[index], mask[index], _take(cache, index))
        width = max(self.parts[part][0].shape[1] for part, _ in chosen)
        ids = self.parts[0][0].new_zeros(len(chosen), width)
        mask = torch.zeros_like(ids)
        tensors = [tuple(t.new_zeros(len(chosen), t.shape[1], width, t.shape[3]) for t in (layer.keys, layer.values))
                   for layer in _layers(self.parts[0][2])]
        for part, (part_ids, part_mask, cache) in enumerate(self.parts):
            out = [k for k, (q, _) in enumerate(chosen) if q == part]
            if not out:
                continue
            at = torch.tensor(out, device=ids.device)
            index = torch.tensor([chosen[k][1] for k in out], device=ids.device)
            offset = width - part_ids.shape[1]
            ids[at, offset:], mask[at, offset:] = part_ids[index], part_mask[index]
            for (keys, values), layer in zip(tensors, _layers(cache)):
                keys[at, :, offset:], values[at, :, offset:] = layer.keys[index], layer.values[index]
        return Prefix(ids, mask, _with_tensors(self.parts[0][2], tensors))


def prefill_prefixes(model, prefixes: list[list[int]], pad_id: int, before=None, split: bool = False,
                     heads: dict | None = None, profile: DeviceProfile | None = None) -> Openings:
    """The distinct prefixes run once, left-padded: in one forward, or with ``split`` in runs of similar
    length (``length_runs``; where the cache allows stacking its rows again). ``before(rows)`` is called
    with the first row using each distinct prefix of a forward (to set per-row state). With ``split`` and no
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
    skip = 0 if head is None else head.parts[0][0].shape[1]
    runs = length_runs([len(k) for k in keys], profile.run_cost) if split else [list(range(len(keys)))]
    parts, where = [], {}
    for part, run in enumerate(runs):
        batch = {k: v.to(device) for k, v in left_pad([list(keys[d][skip:]) for d in run], pad_id).items()}
        if before is not None:
            before([first.index(d) for d in run])
        prefix = None if head is None else head.rows([0] * len(run))  # each row continues its copy of the head
        cache = forward_after(model, prefix, batch, 1)[CACHE_KWARG]
        if prefix is not None:
            batch = {k: torch.cat([getattr(prefix, k), batch[k]], 1) for k in ("input_ids", "attention_mask")}
        if len(runs) > 1 and _layers(cache) is None:  # rows of this cache cannot be stacked: one forward
            return prefill_prefixes(model, prefixes, pad_id, before, profile=profile)
        parts.append((batch["input_ids"], batch["attention_mask"], cache))
        where.update((d, (part, row)) for row, d in enumerate(run))
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
        heads[tokens] = head if _layers(head.parts[0][2]) is not None else None
    return heads[tokens]


def cheapest_split(widths: list[int], fixed: float, spread: float = float("inf")) -> list[tuple[int, int]]:
    """Contiguous groups [a, b) of items, each group costing ``fixed`` plus its items times its widest item,
    no group's widths differing by more than ``spread``: the split with the least total cost (dynamic
    programming, O(n^2))."""
    n = len(widths)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for b in range(1, n + 1):
        widest, narrowest = 0, float("inf")
        for a in range(b - 1, -1, -1):
            widest, narrowest = max(widest, widths[a]), min(narrowest, widths[a])
            if widest - narrowest > spread:
                break
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


def forward_after(model, prefix: Prefix | None, batch: dict[str, torch.Tensor], keep: int):
    """The model over ``batch`` (input_ids, attention_mask: the tokens after each row's prefix), continuing
    ``prefix``'s cache (which it extends) with positions counted over the real tokens before."""
    mask = batch["attention_mask"] if prefix is None else torch.cat([prefix.attention_mask, batch["attention_mask"]], 1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -batch["input_ids"].shape[1]:]
    set_token_mask(model, batch["attention_mask"])
    return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True,
                 logits_to_keep=keep, **({} if prefix is None else {CACHE_KWARG: prefix.cache}))


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
        yield run, forward_after(model, openings and openings.rows(run), rest, keep)


# ------------------------------------------------------------------------------ rows in the middle of decoding
@dataclass
class Decoding:
    """Rows in the middle of generation, as generate() continues them: each row's tokens so far (its prompt
    then what it generated; left-padded, holes masked) and the KV cache of all but its last token; which
    example each row is (``rows``) and how many tokens it has generated."""

    rows: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cache: object
    generated: list[int]
    # where each row's tokens end, when not at the last column (rows prefilled with their targets after
    # their prompts); the cache holds at least all but each row's last token. ``join`` right-aligns them.
    ends: list[int] | None = None

    def __len__(self) -> int:
        return len(self.rows)


def _firsts(mask: torch.Tensor) -> list[int]:
    """Each row's first real column in a (b, t) mask."""
    return mask.int().argmax(-1).tolist()


def _spans(parts: list[Decoding]) -> list[tuple[Decoding, int, int, int]]:
    """(part, row, first real column, end) of every row, longest first."""
    spans = []
    for part in parts:
        firsts = _firsts(part.attention_mask)
        ends = part.ends or [part.input_ids.shape[1]] * len(part)
        spans += [(part, row, first, end) for row, (first, end) in enumerate(zip(firsts, ends))]
    return sorted(spans, key=lambda span: span[2] - span[3])  # ``rows_sdpa`` groups rows of similar width


def _write_rows(spans, layers, at_row: int, width: int, pad_id: int, margin: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``at_row``.. of the cache buffers get the spans' caches right-aligned to ``width`` tokens (the
    ``margin`` columns of padding before each zeroed; None: all of it); returns their tokens and mask."""
    ids = spans[0][0].input_ids.new_full((len(spans), width), pad_id)
    mask = torch.zeros_like(ids)
    for j, (part, row, first, end) in enumerate(spans):
        at = width - (end - first)
        ids[j, at:], mask[j, at:] = part.input_ids[row, first:end], part.attention_mask[row, first:end]
        for layer, source in zip(layers, _layers(part.cache)):
            for buffer, tensor in ((layer._keys, source.keys), (layer._values, source.values)):
                buffer[at_row + j, :, 0 if margin is None else max(0, at - margin): at] = 0  # masked, but read
                buffer[at_row + j, :, at: width - 1] = tensor[row, :, first: end - 1]
    return ids, mask


def join(pool: Decoding | None, parts: list[Decoding], pad_id: int, capacity: int = 0, room: int = GROWTH,
         margin: int | None = None) -> Decoding:
    """A decoding batch (``pool``, or None) joined by prefilled rows (``parts``). Each row's tokens, from its
    first real one to its end, right-aligned and left-padded, its cache alike. The parts' rows are written
    into the pool's free rows when they fit its width and its buffers have ``room`` for the tokens to come:
    the pool's own rows are not copied. Otherwise every row is copied, longest first, into new buffers with
    room for ``capacity`` rows and for a quarter of the width more than ``room`` tokens, and the columns
    that are padding in every row are dropped (``GrowingLayer``). The padding before a row is zeroed
    ``margin`` columns deep (None: all of it), as far as a decoding step may read it (``row_groups``)."""
    spans = _spans(parts)
    if pool is not None:
        layers = _layers(pool.cache)
        width = pool.input_ids.shape[1]
        if (all(type(layer) is GrowingLayer for layer in layers) and len(pool) + len(spans) <= layers[0].capacity
                and width - 1 + room <= layers[0]._keys.shape[2] and all(end - first <= width for _, _, first, end in spans)):
            ids, mask = _write_rows(spans, layers, len(pool), width, pad_id, margin)
            for layer in layers:
                layer.rows += len(spans)
            joined = _decoding(spans, ids, mask, pool.cache)
            return Decoding(pool.rows + joined.rows, torch.cat([pool.input_ids, ids]),
                            torch.cat([pool.attention_mask, mask]), pool.cache, pool.generated + joined.generated)
        spans = _spans([pool] + parts)
    width = max(end - first for _, _, first, end in spans)
    sources = _layers(spans[0][0].cache)
    rows = max(capacity, len(spans))
    tokens = width - 1 + max(room, GROWTH) + width // 4  # a pool with room to decode and to take rows for a while
    layers = [GrowingLayer(*(_buffer(t, rows, tokens) for t in (layer.keys, layer.values)), len(spans), width - 1)
              for layer in sources]
    ids, mask = _write_rows(spans, layers, 0, width, pad_id, margin)
    cache = copy.copy(spans[0][0].cache)
    cache.layers = layers
    return _decoding(spans, ids, mask, cache)


def _decoding(spans, ids: torch.Tensor, mask: torch.Tensor, cache) -> Decoding:
    """The spans' rows as a Decoding (their examples and generated counts, in span order)."""
    return Decoding([part.rows[row] for part, row, _, _ in spans], ids, mask, cache,
                    [part.generated[row] for part, row, _, _ in spans])


def keep(d: Decoding, positions: list[int], margin: int | None = None) -> Decoding | None:
    """The rows at ``positions`` (None for none; ``d`` is used up): in a joined batch the kept rows move
    up inside the cache's buffers, so nothing is reallocated and the freed rows take the next ``join``. A
    row moves from ``margin`` columns before its first real one (None: whole): no decoding step reads further left."""
    if not positions:
        return None
    index = torch.tensor(positions, device=d.input_ids.device)
    firsts = _firsts(d.attention_mask)
    moves = [(j, p, 0 if margin is None else max(0, firsts[p] - margin))
             for j, p in enumerate(positions) if j != p]  # j < p: up over rows that left
    for layer in _layers(d.cache):
        for buffer in (layer._keys, layer._values):
            for j, p, at in moves:
                buffer[j, :, at: layer.length] = buffer[p, :, at: layer.length]
        layer.rows = len(positions)
    return Decoding([d.rows[p] for p in positions], d.input_ids[index], d.attention_mask[index], d.cache,
                    [d.generated[p] for p in positions])


# ------------------------------------------------------------------ decoding attention over each row's own width
ROWS_ATTENTION = "rexft_sdpa_rows"
_PLAN: ContextVar[list[tuple[int, int, int]] | None] = ContextVar("rexft_decode_plan", default=None)


def row_groups(starts: list[int], width: int, call_cost: int, margin: int) -> list[tuple[int, int, int]]:
    """Contiguous groups of rows (a, b, first key) for attention over ``width`` keys when row r's real keys
    begin at ``starts[r]``: each group attends from its earliest start, no row reads more than ``margin``
    keys before its own, and the groups minimise sum(call_cost + rows * keys). Rows ordered longest first
    (``join``) make the groups tight."""
    return [(a, b, min(starts[a:b])) for a, b in cheapest_split([width - s for s in starts], call_cost, margin)]


@contextmanager
def decode_plan(groups: list[tuple[int, int, int]] | None):
    """Within: decoding steps over exactly ``groups[-1][1]`` rows attend in these groups (``rows_sdpa``). Set
    once per run of decoding steps, on the host: a row's first real key does not move while it decodes, so
    no layer asks the device where rows begin."""
    token = _PLAN.set(groups)
    try:
        yield
    finally:
        _PLAN.reset(token)


def rows_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, but a decoding step (one query per row) under a ``decode_plan`` attends
    in its groups of rows, each from its rows' earliest real key, not every row over the batch's widest: on
    a CPU a decoding step's attention reads the whole KV cache, and the left padding of a batch mixing short
    and long prompts was half of it. Keys before a row's first real one are masked anyway: same result.
    Several queries per row under a mask (a prefill) on a CPU: ``masked_gqa_sdpa``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1:
        return masked_gqa_sdpa(module, query, key, value, attention_mask, **kwargs)
    groups = _PLAN.get()
    if groups is None or attention_mask is None or attention_mask.dim() != 4 or groups[-1][1] != query.shape[0]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = [sdpa_attention_forward(module, query[a:b], key[a:b, :, s:], value[a:b, :, s:],
                                      attention_mask[a:b, :, :, s:], **kwargs)[0] for a, b, s in groups]
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)), None


def masked_gqa_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention; but where it would copy each key/value head once per query head it
    shares (grouped-query attention under a mask: SmolLM2's 3 key/value heads serve 9 query heads), on a CPU
    SDPA reads the shared heads itself (``enable_gqa``): the same result without the copy, 3-5% of a
    prefill's time after a task's opening."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    simple = (query.device.type == "cpu" and attention_mask is not None and query.shape[1] != key.shape[1]
              and not kwargs.get("dropout") and all(kwargs.get(k) is None for k in ("softcap", "position_bias", "s_aux")))
    if not simple:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           scale=kwargs.get("scaling"), enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


class rows_attention:
    """Within this context a model using SDPA attends with ``rows_sdpa``, registered with transformers'
    ``AttentionInterface`` and set with ``set_attn_implementation`` (other implementations are left as they
    are; nested, the outer one holds). ``active``: whether it does."""

    def __init__(self, model):
        self.model = model
        self.active = getattr(getattr(model, "config", None), "_attn_implementation", None) == "sdpa"

    def __enter__(self):
        if self.active:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

            AttentionInterface.register(ROWS_ATTENTION, rows_sdpa)
            AttentionMaskInterface.register(ROWS_ATTENTION, sdpa_mask)
            self.model.set_attn_implementation(ROWS_ATTENTION)
        return self

    def __exit__(self, *exc):
        if self.active:
            self.model.set_attn_implementation("sdpa")


# ------------------------------------------------------------------------------------------ device profiles
@dataclass(frozen=True)
class DeviceProfile:
    """What the pool trades off on one kind of device. The CPU's figures were measured (2-core AVX-512
    machine, SmolLM2-135M); the others are starting points, overridable with ``eval.profile``."""

    run_cost: int = 48  # a forward's fixed cost (every weight read once) in tokens: ~75 ms against ~1.6 ms a token
    call_cost: int = 512  # one attention call costs about as much as this many (row, key position) pairs
    # Padding keys a decoding step may read before a row's first real key (masked, so they must be finite):
    # ``join`` zeroes that many, not the row's whole padding, ``keep`` moves them with the row, and the
    # decoding groups keep every row within them.
    read_margin: int = 64
    decode_chunk: int = 4  # tokens decoded between the moments rows leave and join the decoding batch
    decode_batch_size: int = 64  # rows decoding together (eval.decode_batch_size overrides)


# An accelerator runs a forward's weights in parallel: its fixed cost is worth far more tokens, and an
# attention call's launch far more (row, key) pairs, so it batches more and splits less (not yet measured).
PROFILES = {"cpu": DeviceProfile(),
            "accelerator": DeviceProfile(run_cost=1024, call_cost=1 << 16, decode_chunk=16, decode_batch_size=256)}


def device_profile(device, overrides: dict | None = None) -> DeviceProfile:
    """The profile of ``device``'s type (every type but the CPU: an accelerator's), with ``overrides``."""
    from dataclasses import fields

    from rexft.errors import RexftError

    unknown = set(overrides or {}) - {f.name for f in fields(DeviceProfile)}
    if unknown:
        raise RexftError(f"eval.profile has unknown key(s) {sorted(unknown)}; valid: {[f.name for f in fields(DeviceProfile)]}")
    base = PROFILES["cpu" if torch.device(device).type == "cpu" else "accelerator"]
    return replace(base, **(overrides or {}))


# ---------------------------------------------------------------------------------------------- the engine
@dataclass
class Feed:
    """A server's hooks into ``PoolEngine.generate`` (``rexft serve``'s local backend): rows that arrive while
    it decodes join the decoding batch, each row stops at its own token limit, and each row's tokens so far
    are handed out after every chunk (a stream's deltas). ``arrivals()`` returns batches of new row ids whose
    prompts it has added to the ``prompts`` dict generate() was given; ``limit(id)`` a row's most new tokens
    (0 ends it at the next chunk: a client gone); ``partial(id, tokens)`` sees an unfinished row's tokens."""

    arrivals: Callable[[], list[list[int]]]
    limit: Callable[[int], int]
    partial: Callable[[int, list[int]], None]


class PoolEngine(PlainEngine):
    """The plain engine's calls, batched for a CPU: a task's shared opening runs once (and the head all
    openings share, once per eval), the rest in runs of similar length (``length_runs``); generation prefills
    each row's prompt with its target after it (the target's log-likelihood from the same pass), then up to
    ``decode_batch_size`` rows decode together, every ``decode_chunk`` tokens finished rows leave and
    prefilled rows join (``join``, ``keep``); decoding steps attend per group of rows (``rows_sdpa``)."""

    def __init__(self, model, tokenizer, rows: RowState | None = None, batch_size: int = 16, progress=None,
                 profile: DeviceProfile | None = None, share_prefixes: bool = True, feed: Feed | None = None):
        super().__init__(model, tokenizer, rows, batch_size, progress)
        self.profile = profile or device_profile(self.device)
        self.feed = feed
        # Rows of a group share their opening's KV cache only where the model computes the same for all of them.
        self.share_prefixes = share_prefixes and (rows is None or rows.varies != "row")

    def _before(self, ids: list[int]):
        """Per-opening state for ``prefill_prefixes`` (None where it is the same for every row)."""
        if self.rows is None or self.rows.varies is None:
            return None
        return lambda positions: self._set_rows([ids[r] for r in positions])

    def _openings(self, prompts: dict[int, list[int]], groups: dict[int, object],
                  sizes: dict[int, int]) -> tuple[dict[int, int], list[int] | None]:
        """How many tokens each prompt shares with its group's, and the batching order (by ``sizes``) that
        keeps a group's rows together; ({}, None) where openings are not shared."""
        if not self.share_prefixes:
            return {}, None
        shared = shared_prefix_lengths(prompts, groups)
        return shared, shared_prefix_order(sizes, groups, shared)

    @torch.inference_mode()
    def next_logprobs(self, prompts: dict[int, list[int]], groups: dict[int, object]) -> Iterator[tuple[list[int], torch.Tensor]]:
        sizes = {i: len(p) for i, p in prompts.items()}
        shared, order = self._openings(prompts, groups, sizes)
        heads: dict = {}  # the openings' common head, run once for every batch
        with rows_attention(self.model):
            for ids in self.batches(sizes, order):
                yield ids, self._last_logprobs(ids, prompts, shared, heads)
                self.progress(len(ids))

    def _last_logprobs(self, ids: list[int], prompts: dict[int, list[int]], shared: dict[int, int], heads: dict) -> torch.Tensor:
        """log-softmax at each row's last position (b, V): the batch's distinct openings once, then the rows'
        rests in runs of similar length (a batch keeps a group's rows together, whatever their lengths)."""
        lengths = batch_openings(ids, prompts, shared)
        if not any(lengths):
            return self.forward([prompts[i] for i in ids], ids, 1)[:, -1].float().log_softmax(-1)
        self._set_rows(ids)
        sequences = [prompts[i] for i in ids]
        with route_logs_paused(self.model):  # a routing heatmap counts each row once, from the passes below
            openings = prefill_prefixes(self.model, [s[:n] for s, n in zip(sequences, lengths)], self.pad_id,
                                        self._before(ids), split=True, heads=heads, profile=self.profile)
        out = None
        for run, output in forward_rests(self.model, sequences, lengths, openings, self.pad_id, 1,
                                         lambda run: self._set_rows([ids[r] for r in run]), self.profile):
            logprobs = output.logits[:, -1].float().log_softmax(-1)
            if out is None:
                out = logprobs.new_empty(len(ids), logprobs.shape[-1])
            out[run] = logprobs
        return out

    def continuation_logprobs(self, pairs):
        with rows_attention(self.model):
            return super().continuation_logprobs(pairs)

    @torch.inference_mode()
    def generate(self, prompts: dict[int, list[int]], targets: dict[int, list[int]], groups: dict[int, object],
                 config, settings) -> Iterator[Generated]:
        """Greedy or sampled, one sequence per row: batches prefilled in turn (``_prefill``), their rows
        decoding together in chunks of ``decode_chunk`` tokens; after each chunk finished rows leave and
        prefilled batches join while there is room. Beams: the plain engine's way."""
        with rows_attention(self.model) as attention:
            if settings.num_beams > 1:
                yield from super().generate(prompts, targets, groups, config, settings)
                return
            sizes = {i: len(p) + len(targets.get(i, ())) for i, p in prompts.items()}
            shared, order = self._openings(prompts, groups, sizes)
            yield from self._decode(list(self.batches(sizes, order)), prompts, targets, shared, config, settings,
                                    self.profile.read_margin if attention.active else None)

    def _decode(self, batches, prompts, targets, shared, config, settings, margin: int | None) -> Iterator[Generated]:
        profile, capacity = self.profile, settings.decode_batch_size or self.profile.decode_batch_size
        limit = self.feed.limit if self.feed else lambda i: settings.max_new_tokens
        queue = list(reversed(batches))
        pool: Decoding | None = None
        waiting: list[Decoding] = []  # prefilled rows not decoding yet, where caches cannot be joined
        pooled = bool(batches) and self._joinable_cache(batches[0][0], prompts[batches[0][0]][:1])
        heads: dict = {}
        sums: dict[int, float] = {}
        while True:
            if self.feed:  # rows that arrived meanwhile queue behind those waiting
                queue[:0] = reversed(self.feed.arrivals())
            if not (queue or waiting or pool is not None):
                break
            if pool is None and waiting:
                pool = waiting.pop(0)
            elif queue and (pool is None or pooled and len(pool) + len(queue[-1]) <= capacity):
                parts, rows = [], 0 if pool is None else len(pool)  # room for a batch: refill
                while queue and (not parts and not rows or rows + len(queue[-1]) <= capacity):
                    batch_sums, prefilled = self._prefill(queue.pop(), prompts, shared, targets, pooled, heads)
                    sums.update(batch_sums)
                    parts += prefilled
                    rows += sum(map(len, prefilled))
                    if not pooled:  # e.g. sliding-window caches: each part decodes on its own, to its end
                        break
                if pooled:
                    pool = join(pool, parts, self.pad_id, capacity, settings.max_new_tokens, margin)
                else:
                    waiting += parts
                    pool = waiting.pop(0)
            self._set_rows(pool.rows)  # stays set for every decoding step
            set_token_mask(self.model, None)
            budget = max(1, max(limit(i) - n for i, n in zip(pool.rows, pool.generated)))
            config.max_new_tokens = min(profile.decode_chunk, budget) if pooled else budget
            width = pool.input_ids.shape[1]
            plan = row_groups(_firsts(pool.attention_mask), width, profile.call_cost, margin) if margin is not None else None
            with route_logs_paused(self.model), decode_plan(plan):
                out = self.model.generate(input_ids=pool.input_ids, attention_mask=pool.attention_mask,
                                          **{CACHE_KWARG: pool.cache}, generation_config=config,
                                          tokenizer=self.tokenizer if settings.stop else None)
            steps = out.shape[1] - width
            pool.input_ids = out
            pool.attention_mask = torch.cat([pool.attention_mask, pool.attention_mask.new_ones(len(pool), steps)], 1)
            going = []
            for row, (i, before) in enumerate(zip(pool.rows, pool.generated)):
                pool.generated[row] = before + steps
                tokens = out[row, out.shape[1] - pool.generated[row]:][: limit(i)].tolist()
                if self._finished(tokens, limit(i), settings):
                    yield Generated(i, tokens, sums.get(i))
                    self.progress(1)
                else:
                    going.append(row)
                    if self.feed:
                        self.feed.partial(i, tokens)
            pool = keep(pool, going, margin)

    def _prefill(self, batch_ids: list[int], prompts: dict[int, list[int]], shared: dict[int, int],
                 targets: dict[int, list[int]], aligned: bool, heads: dict) -> tuple[dict[int, float], list[Decoding]]:
        """Fill the KV cache of a batch's prompts but their last token (generate() feeds that itself): each
        distinct shared opening once, then, in runs of rows of similar length, every row's remaining prompt
        tokens followed by its target when it has one (its summed log-probability). ``aligned``: each row's
        target right after its prompt, rows left-padded as a whole (the rows' prompts end at different
        columns, which ``join`` aligns); else targets right-padded after the left-padded prompts and the
        cache cropped to them (for caches ``join`` cannot rebuild). Returns the targets' log-probabilities
        and the rows ready for generate(), one part per run."""
        lengths = batch_openings(batch_ids, prompts, shared)
        openings = None
        if any(lengths):
            self._set_rows(batch_ids)
            with route_logs_paused(self.model):  # a routing heatmap counts each row once, from the pass below
                openings = prefill_prefixes(self.model, [prompts[i][:n] for i, n in zip(batch_ids, lengths)], self.pad_id,
                                            self._before(batch_ids), split=aligned, heads=heads, profile=self.profile)
        sums, parts = {}, []
        sizes = [len(prompts[i]) - n + len(targets.get(i, ())) for i, n in zip(batch_ids, lengths)]
        for run in length_runs(sizes, self.profile.run_cost):
            rows = [batch_ids[r] for r in run]
            rests = [prompts[i][lengths[r]:] for r, i in zip(run, rows)]
            answers = [targets.get(i, []) for i in rows]
            longest = max(map(len, answers))
            if aligned:
                batch = left_pad([rest + answer for rest, answer in zip(rests, answers)], self.pad_id)
            else:  # targets right-padded after the left-padded prompts
                rest = left_pad(rests, self.pad_id)
                tail = torch.tensor([a + [self.pad_id] * (longest - len(a)) for a in answers], dtype=torch.long)
                tail_mask = torch.tensor([[1] * len(a) + [0] * (longest - len(a)) for a in answers], dtype=torch.long)
                batch = {"input_ids": torch.cat([rest["input_ids"], tail.view(len(rows), longest)], 1),
                         "attention_mask": torch.cat([rest["attention_mask"], tail_mask.view(len(rows), longest)], 1)}
            batch = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask")}
            prefix = openings.rows(run) if openings is not None else None
            self._set_rows(rows)
            out = forward_after(self.model, prefix, batch, longest + 1)
            if longest:  # the logits predicting each real target token, and only those, through the softmax
                summed = summed_logprobs(out.logits, answers, aligned_right=aligned).tolist()
                sums.update((i, s) for i, s, answer in zip(rows, summed, answers) if answer)
            cache = out[CACHE_KWARG]  # the output field is named like generate()'s argument
            ids, mask = batch["input_ids"], batch["attention_mask"]
            if not aligned:  # keep the prompts but their last position
                cache.crop(-(longest + 1))
                ids, mask = ids[:, : ids.shape[1] - longest], mask[:, : mask.shape[1] - longest]
            if prefix is not None:
                ids, mask = torch.cat([prefix.input_ids, ids], 1), torch.cat([prefix.attention_mask, mask], 1)
            ends = [ids.shape[1] - len(answer) for answer in answers] if aligned else None
            parts.append(Decoding(rows, ids, mask, cache, [0] * len(rows), ends))
        return sums, parts

    def _joinable_cache(self, id: int, token: list[int]) -> bool:
        """Whether this model's KV cache lets rows be joined and dropped (``poolable``): one token's probe
        (with example ``id``'s row state)."""
        self._set_rows([id])
        set_token_mask(self.model, None)
        with route_logs_paused(self.model):
            probe = self.model(input_ids=torch.tensor([token], device=self.device), use_cache=True, logits_to_keep=1)
        return poolable(probe[CACHE_KWARG])

    def _finished(self, tokens: list[int], limit: int, settings) -> bool:
        """Whether a row's generated tokens end it: EOS, its limit of new tokens, or a stop string in the text."""
        if len(tokens) >= limit or self.tokenizer.eos_token_id in tokens:
            return True
        return bool(settings.stop) and any(m in self.tokenizer.decode(tokens, skip_special_tokens=True) for m in settings.stop)
