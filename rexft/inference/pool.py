"""The pooled engine: a group's shared opening run once, and rows that join and leave one decoding batch.

Generation prefills each batch of rows (``rexft.inference.prefix``: the openings once, then every row's
rest with its target after it, whose log-likelihood comes from the same pass), then decodes up to
``decode_batch_size`` rows together in a ``DecodeBatch``: one transformers ``StaticCache`` whose rows are
slots, every row right-aligned to the column the next token is written to, so a step writes in place (a
``DynamicCache`` concatenates a copy of the whole cache every step). Every ``decode_chunk`` tokens the
chunk's tokens come to the host at once (the one sync of a chunk), finished rows leave (EOS, their limit,
a stop string: ``StopWatch``) and prefilled rows take the free slots. A batch is rebuilt, the columns that
are padding in every row dropped, when a joining row is wider than the batch or the room runs out, and
shrunk to its rows when they are few and none wait.

A step's attention reads the keys each group of slots needs, from the group's first real key to the
written column (``rows_sdpa``, in effect inside ``row_attention``): short rows beside long ones do not
read the batch's widest padding, nor the room not yet written. Where the model's cache is not plain
full-attention layers (sliding windows), or for beams, generation is the plain engine's.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from rexft.adapters import route_logs_paused, set_token_mask
from rexft.inference.engine import Feed, Generated, PlainEngine, Row, RowState, Sampling, generation_config, left_pad, summed_logprobs
from rexft.inference.prefix import (batch_openings, cache_kwarg, cheapest_split, forward_after, forward_rests, length_runs,
                                    prefill_prefixes, shared_prefix_lengths, shared_prefix_order)
from rexft.inference.profile import DeviceProfile, device_profile
from rexft.inference.stops import StopWatch

ROOM = 32  # columns a decoding batch has beyond its rows' tokens and their max_new_tokens, for rows joining later


@dataclass
class Waiting:
    """Rows ready to decode, held in rows ``index`` of ``cache``: row i's keys at ``columns[i]`` there (its
    real tokens, in order: not the padding, nor the holes between an opening and its rest), its next input
    token ``last[i]`` and that token's position (``positions[i]``: as many as its keys)."""

    ids: list[int]
    cache: object
    index: list[int]
    columns: list[list[int]]
    last: torch.Tensor
    positions: torch.Tensor

    @property
    def width(self) -> int:
        return max(len(columns) for columns in self.columns)


def poolable(model) -> bool:
    """Whether this model's rows can decode in a ``DecodeBatch``: a static cache of plain full-attention
    layers that count their own length (transformers 5)."""
    layers = StaticCache(config=model.config, max_cache_len=1).layers
    return all(type(layer) is StaticLayer for layer in layers) and hasattr(layers[0], "cumulative_length")


class DecodeBatch:
    """Slots of one static cache, each free or holding a row (``ids``), every row's keys ending at ``column``,
    where the next step writes: its mask, next input token and position per slot, on the device; where each
    row's keys start (``starts``), on the host."""

    def __init__(self, model, slots: int, columns: int, like: Waiting, width: int):
        layers = like.cache.layers
        self.cache = StaticCache(config=model.config, max_cache_len=columns)
        self.cache.early_initialization(slots, [l.keys.shape[1] for l in layers], [l.keys.shape[3] for l in layers],
                                        layers[0].keys.dtype, layers[0].keys.device)
        device = layers[0].keys.device
        self.mask = torch.zeros(slots, columns, dtype=torch.long, device=device)
        self.last = torch.zeros(slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.ids: list[int | None] = [None] * slots
        self.starts = [width] * slots
        self.column = width
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(width)  # where StaticLayer.update writes the next token

    @property
    def free(self) -> list[int]:
        return [s for s, i in enumerate(self.ids) if i is None]

    @property
    def rows(self) -> int:
        return len(self.ids) - len(self.free)

    @property
    def room(self) -> int:
        return self.cache.layers[0].max_cache_len - self.column

    def fits(self, waiting: Waiting) -> bool:
        return len(waiting.ids) <= len(self.free) and waiting.width <= self.column

    def place(self, waiting: Waiting) -> None:
        """The waiting rows into free slots, their keys side by side up to ``column`` (holes closed up: a key
        carries its position in its rotation, so only the mask would see them): per layer one copy of all."""
        slots = self.free[: len(waiting.ids)]
        rows_to, cols_to, rows_from, cols_from = [], [], [], []
        for slot, row, columns in zip(slots, waiting.index, waiting.columns):
            n = len(columns)
            rows_to += [slot] * n
            cols_to += range(self.column - n, self.column)
            rows_from += [row] * n
            cols_from += columns
            self.starts[slot] = self.column - n
        device = self.mask.device
        to = (torch.tensor(rows_to, dtype=torch.long, device=device), torch.tensor(cols_to, dtype=torch.long, device=device))
        source = (torch.tensor(rows_from, dtype=torch.long, device=device), torch.tensor(cols_from, dtype=torch.long, device=device))
        for layer, src in zip(self.cache.layers, waiting.cache.layers):
            layer.keys[to[0], :, to[1]] = src.keys[source[0], :, source[1]]
            layer.values[to[0], :, to[1]] = src.values[source[0], :, source[1]]
        at = torch.tensor(slots, dtype=torch.long, device=device)
        self.mask[at] = 0
        self.mask[to] = 1
        self.last[at], self.positions[at] = waiting.last, waiting.positions
        for slot, i in zip(slots, waiting.ids):
            self.ids[slot] = i

    def waiting(self) -> Waiting:
        """Its rows, as rows waiting to be placed in another batch."""
        slots = [s for s, i in enumerate(self.ids) if i is not None]
        at = torch.tensor(slots, dtype=torch.long, device=self.mask.device)
        return Waiting([self.ids[s] for s in slots], self.cache, slots,
                       [list(range(self.starts[s], self.column)) for s in slots], self.last[at], self.positions[at])

    def step_groups(self, call_cost: int) -> list[tuple[int, int, int]]:
        """Contiguous groups of slots (a, b, first key) for a step's attention (``row_groups``); a free slot
        reads only the written column."""
        starts = [self.starts[s] if i is not None else self.column for s, i in enumerate(self.ids)]
        return row_groups(starts, self.column + 1, call_cost)

    def decode(self, model, steps: int, pick, call_cost: int) -> list[list[int]]:
        """``steps`` tokens for every slot; the chunk's tokens per slot, fetched at once."""
        tokens = []
        plan = DecodePlan(self.step_groups(call_cost), self.column + 1)
        with decode_plan(plan):
            for _ in range(steps):
                self.mask[:, self.column] = 1
                out = model(input_ids=self.last[:, None], attention_mask=self.mask, position_ids=self.positions[:, None],
                            use_cache=True, logits_to_keep=1, **{cache_kwarg(model): self.cache})
                self.last = pick(out.logits[:, -1])
                tokens.append(self.last)
                self.positions += 1
                self.column += 1  # StaticLayer.update moved its own count on
                plan.end = self.column + 1
        return torch.stack(tokens, 1).tolist()


def build(model, parts: list[Waiting], slots: int, room: int, wide: int = 0) -> DecodeBatch:
    """A fresh decoding batch of ``slots`` slots for these rows, longest first, its width their widest (at
    least ``wide``: the rows still to join, so that they fit without another build) and ``room`` columns more."""
    width = max(wide, *(part.width for part in parts))
    batch = DecodeBatch(model, max(slots, sum(len(p.ids) for p in parts)), width + room, parts[0], width)
    for part in sorted(parts, key=lambda p: -p.width):
        batch.place(part)
    return batch


def sampler(tokenizer, sampling: Sampling) -> Callable[[torch.Tensor], torch.Tensor]:
    """The next token of each row from its logits (b, V): the argmax, or a sample through transformers'
    temperature, top-k and top-p warpers as generate() would apply them (``generation_config``)."""
    if not sampling.do_sample:
        return lambda logits: logits.argmax(-1)
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    config = generation_config(tokenizer, sampling, 0)
    warpers = [TemperatureLogitsWarper(config.temperature)]
    warpers += [TopKLogitsWarper(config.top_k)] if config.top_k else []
    warpers += [TopPLogitsWarper(config.top_p)] if config.top_p < 1 else []

    def pick(logits: torch.Tensor) -> torch.Tensor:
        scores = logits.float()
        for warp in warpers:
            scores = warp(None, scores)
        return torch.multinomial(scores.softmax(-1), 1)[:, 0]

    return pick


class PoolEngine(PlainEngine):
    """The plain engine's calls, batched for a CPU (see the module docstring)."""

    def __init__(self, model, tokenizer, rows: RowState | None = None, batch_size: int = 16, progress=None,
                 profile: DeviceProfile | None = None, share_prefixes: bool = True, feed: Feed | None = None):
        super().__init__(model, tokenizer, rows, batch_size, progress, feed)
        self.profile = profile or device_profile(self.device)
        # Rows of a group share their opening's KV cache only where the model computes the same for all of them.
        self.share_prefixes = share_prefixes and (rows is None or rows.varies != "row")

    def _before(self, ids: list[int]):
        """Per-opening state for ``prefill_prefixes`` (None where it is the same for every row)."""
        if self.rows is None or self.rows.varies is None:
            return None
        return lambda positions: self._set_rows([ids[r] for r in positions])

    def _order(self, by_id: dict[int, Row], sizes: dict[int, int]) -> tuple[dict[int, int], list[int] | None]:
        """How many tokens each prompt shares with its group's, and the batching order that keeps a group's
        rows together; ({}, None) where openings are not shared."""
        if not self.share_prefixes:
            return {}, None
        shared = shared_prefix_lengths({i: r.prompt for i, r in by_id.items()}, {i: r.group for i, r in by_id.items()})
        return shared, shared_prefix_order(sizes, {i: r.group for i, r in by_id.items()}, shared)

    @torch.inference_mode()
    def next_logprobs(self, rows: list[Row]) -> Iterator[tuple[list[int], torch.Tensor]]:
        by_id = {row.id: row for row in rows}
        sizes = {i: len(r.prompt) for i, r in by_id.items()}
        shared, order = self._order(by_id, sizes)
        heads: dict = {}  # the openings' common head, run once for every batch
        with row_attention(self.model):
            for ids in self.batches(sizes, order):
                yield ids, self._last_logprobs(ids, [by_id[i].prompt for i in ids], shared, heads)
                self.progress(len(ids))

    def _last_logprobs(self, ids: list[int], sequences: list[list[int]], shared: dict[int, int], heads: dict) -> torch.Tensor:
        """log-softmax at each row's last position (b, V): the batch's distinct openings once, then the rows'
        rests in runs of similar length."""
        lengths = batch_openings(ids, dict(zip(ids, sequences)), shared)
        if not any(lengths):
            return self.forward(sequences, ids, 1)[:, -1].float().log_softmax(-1)
        self._set_rows(ids)
        with route_logs_paused(self.model):  # a routing heatmap counts each row once, from the passes below
            openings = prefill_prefixes(self.model, [s[:n] for s, n in zip(sequences, lengths)], self.pad_id,
                                        self._before(ids), split=True, heads=heads, profile=self.profile)
        out = None
        for run, output in forward_rests(self.model, sequences, lengths, openings, self.pad_id, 1,
                                         lambda run: self._set_rows([ids[r] for r in run]), self.profile):
            logprobs = output.logits[:, -1].float().log_softmax(-1)
            out = logprobs.new_empty(len(ids), logprobs.shape[-1]) if out is None else out
            out[run] = logprobs
        return out

    def score(self, rows):
        with row_attention(self.model):
            return super().score(rows)

    @torch.inference_mode()
    def generate(self, rows: list[Row], sampling: Sampling) -> Iterator[Generated]:
        with row_attention(self.model):
            if sampling.num_beams > 1 or not poolable(self.model):
                yield from super().generate(rows, sampling)
                return
            yield from self._decode(rows, sampling)

    def _decode(self, rows: list[Row], sampling: Sampling) -> Iterator[Generated]:
        by_id = {row.id: row for row in rows}
        sizes = {i: len(r.prompt) + len(r.target) for i, r in by_id.items()}
        shared, order = self._order(by_id, sizes)
        queue = [[by_id[i] for i in ids] for ids in self.batches(sizes, order)]
        slots = sampling.decode_batch_size or self.profile.decode_batch_size
        room = sampling.max_new_tokens + ROOM
        limit = self.feed.limit if self.feed else lambda i: sampling.max_new_tokens
        pick, heads, sums, watches = sampler(self.tokenizer, sampling), {}, {}, {}
        batch: DecodeBatch | None = None
        while True:
            if self.feed:  # rows that arrived meanwhile queue behind those waiting
                queue += self.feed.arrivals()
            if batch is None and not queue:
                return
            while queue and (batch is None or batch.rows + len(queue[0]) <= len(batch.ids)):  # room for a batch
                wide = max(len(row.prompt) - 1 for rows in queue for row in rows)  # a build's width: every row waiting
                for part in self._prefill(queue.pop(0), shared, heads, sums):
                    watches.update((i, StopWatch(self.tokenizer, limit(i), sampling.stop)) for i in part.ids)
                    if batch is not None and batch.fits(part):
                        batch.place(part)
                    else:  # the first rows, or a row wider than the batch: all (re)built
                        batch = build(self.model, ([batch.waiting()] if batch else []) + [part], slots, room, wide)
            live = [i for i in batch.ids if i is not None]
            steps = min(self.profile.decode_chunk, max(1, max(limit(i) - len(watches[i].tokens) for i in live)))
            if batch.room < steps or not queue and len(live) <= len(batch.ids) // 2:  # out of room, or draining
                batch = build(self.model, [batch.waiting()], slots if queue else len(live), room)
            self._set_rows([live[0] if i is None else i for i in batch.ids])  # free slots: any row's state
            set_token_mask(self.model, None)
            with route_logs_paused(self.model):
                chunk = batch.decode(self.model, steps, pick, self.profile.call_cost)
            for slot, i in enumerate(batch.ids):
                if i is None:
                    continue
                if watches[i].add(chunk[slot]) or len(watches[i].tokens) >= limit(i):
                    yield Generated(i, watches.pop(i).tokens, sums.get(i))
                    self.progress(1)
                    batch.ids[slot] = None
                elif self.feed:
                    self.feed.partial(i, watches[i].tokens)
            if not batch.rows:
                batch = None

    def _prefill(self, rows: list[Row], shared: dict[int, int], heads: dict, sums: dict[int, float]) -> list[Waiting]:
        """The KV cache of a batch's prompts but their last token (the first decoding step feeds it): each
        distinct shared opening once, then, in runs of rows of similar length, every row's remaining prompt
        tokens followed by its target (whose summed log-probability goes to ``sums``). One part per run."""
        ids = [row.id for row in rows]
        prompts = {row.id: row.prompt for row in rows}
        lengths = batch_openings(ids, prompts, shared)
        openings = None
        if any(lengths):
            self._set_rows(ids)
            with route_logs_paused(self.model):  # a routing heatmap counts each row once, from the pass below
                openings = prefill_prefixes(self.model, [r.prompt[:n] for r, n in zip(rows, lengths)], self.pad_id,
                                            self._before(ids), split=True, heads=heads, profile=self.profile)
        parts = []
        for run in length_runs([len(r.prompt) - n + len(r.target) for r, n in zip(rows, lengths)], self.profile.run_cost):
            chosen = [rows[r] for r in run]
            sequences = [row.prompt[lengths[r]:] + row.target for r, row in zip(run, chosen)]
            batch = {k: v.to(self.device) for k, v in left_pad(sequences, self.pad_id).items() if k != "position_ids"}
            prefix = openings.rows(run) if openings is not None else None
            self._set_rows([row.id for row in chosen])
            longest = max(len(row.target) for row in chosen)
            out, cache = forward_after(self.model, prefix, batch, longest + 1)
            if longest:  # the logits predicting each real target token, and only those, through the softmax
                summed = summed_logprobs(out.logits, [row.target for row in chosen]).tolist()
                sums.update((row.id, s) for row, s in zip(chosen, summed) if row.target)
            tokens = batch["input_ids"] if prefix is None else torch.cat([prefix.input_ids, batch["input_ids"]], 1)
            mask = batch["attention_mask"] if prefix is None else torch.cat([prefix.attention_mask, batch["attention_mask"]], 1)
            width = tokens.shape[1]
            ends = [width - len(row.target) - 1 for row in chosen]  # each row's last prompt token, fed next
            real = mask.bool().tolist()  # which columns are real tokens (a prefill's one sync)
            columns = [[c for c in range(end) if is_real[c]] for is_real, end in zip(real, ends)]
            index = torch.arange(len(run), device=tokens.device)
            last = tokens[index, torch.tensor(ends, device=tokens.device)]
            positions = torch.tensor([len(c) for c in columns], device=tokens.device)
            parts.append(Waiting([row.id for row in chosen], cache, list(range(len(run))), columns, last, positions))
        return parts


# ------------------------------------------------------------------ a step's attention over each row's own keys
@dataclass
class DecodePlan:
    """Contiguous groups of rows (a, b, first key) of a decoding batch, and the end of the written keys."""

    groups: list[tuple[int, int, int]]
    end: int


_PLAN: ContextVar[DecodePlan | None] = ContextVar("rexft_decode_plan", default=None)


def row_groups(starts: list[int], width: int, call_cost: int) -> list[tuple[int, int, int]]:
    """Contiguous groups of rows (a, b, first key) for attention over ``width`` keys when row r's real keys
    begin at ``starts[r]``: each group attends from its earliest start, and the groups minimise
    sum(call_cost + rows * keys). Rows ordered longest first make the groups tight."""
    return [(a, b, min(starts[a:b])) for a, b in cheapest_split([width - s for s in starts], call_cost)]


@contextmanager
def decode_plan(plan: DecodePlan | None):
    """Within: decoding steps over exactly the plan's rows attend in its groups (``rows_sdpa``). Planned on
    the host: a row's first real key does not move while it decodes, so no layer asks the device."""
    token = _PLAN.set(plan)
    try:
        yield
    finally:
        _PLAN.reset(token)


def rows_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, but a decoding step (one query per row) under a ``decode_plan`` attends
    in its groups of rows, each from its rows' earliest real key to the last written one. Keys outside are
    masked anyway: the same result. Several queries per row (a prefill): ``masked_gqa_sdpa``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1:
        return masked_gqa_sdpa(module, query, key, value, attention_mask, **kwargs)
    plan = _PLAN.get()
    if plan is None or attention_mask is None or attention_mask.dim() != 4 or plan.groups[-1][1] != query.shape[0]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    e = plan.end
    outputs = [sdpa_attention_forward(module, query[a:b], key[a:b, :, s:e], value[a:b, :, s:e],
                                      attention_mask[a:b, :, :, s:e], **kwargs)[0] for a, b, s in plan.groups]
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)), None


def masked_gqa_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention; but where it would copy each key/value head once per query head it
    shares (grouped-query attention under a mask: SmolLM2's 3 key/value heads serve 9 query heads), on a CPU
    SDPA reads the shared heads itself (``enable_gqa``): the same result without the copy."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    simple = (query.device.type == "cpu" and attention_mask is not None and query.shape[1] != key.shape[1]
              and not kwargs.get("dropout") and all(kwargs.get(k) is None for k in ("softcap", "position_bias", "s_aux")))
    if not simple:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           scale=kwargs.get("scaling"), enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def row_attention(model):
    """Within: transformers' "sdpa" attention is ``rows_sdpa`` (which is plain SDPA outside a
    ``decode_plan``); on exit, what it was. Models on another implementation are left as they are; nested,
    the outer one holds."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    mine = (getattr(getattr(model, "config", None), "_attn_implementation", None) == "sdpa"
            and ALL_ATTENTION_FUNCTIONS["sdpa"] is not rows_sdpa)
    if not mine:
        yield
        return
    previous = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = rows_sdpa
    try:
        yield
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]  # back to the registered one; a local override of it, restored
        if ALL_ATTENTION_FUNCTIONS["sdpa"] is not previous:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = previous
