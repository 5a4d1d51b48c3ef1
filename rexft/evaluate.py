"""Eval stage: every task scored with its own protocol, held-in and unseen tasks reported apart.

Protocols (one ``rexft eval`` over a mixed mixture uses each task's own)
    first_token  choice tasks, the T-REX study's: the next-token distribution after the prompt, argmax
                 over the option letters' tokens (``eval.restricted=true``) or over the whole vocabulary
                 (false; a non-letter prediction counts as wrong). Also reports the gold letter's NLL.
    loglik       choice tasks, lm-evaluation-harness style (``eval.protocol=loglik``): sum of
                 log p(option text | prompt) per option; accuracy raw and length-normalised (per byte).
    generate     generative tasks: transformers' generate() (greedy unless eval.do_sample) continuing a KV
                 cache rexft fills: eval.batch_size prompts at a time, in runs of similar length, each with
                 its target after it (the target NLL: mean nats per target token, the target text and EOS,
                 under teacher forcing); for prior-free models a task's shared opening (its instruction)
                 runs once per batch. Up to eval.decode_batch_size rows decode together, each with its own
                 prior at every step; every DECODE_CHUNK tokens the rows that stopped (EOS, a stop string
                 in eval.stop, eval.max_new_tokens) leave and prefilled rows join (rexft/batching.py).
                 Scored by ROUGE-L and exact match (rexft/metrics.py).

Batches are length-sorted and left-padded with explicit position ids, so each row computes exactly what
it would alone, and only the positions a score needs get logits. Unseen tasks (``eval.unseen_tasks``,
never trained on) get their priors from the trained centroids, as training examples did.

``rexft eval`` writes run_dir/eval/: results.json, predictions.jsonl, results.md, and for mixture
adapters routing.png (mean routing weight per task x expert at one layer).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from rexft.adapters import (adapter_layers, load_adapter, read_adapter_config, route_logs_paused, set_prior,
                            set_token_mask)
from rexft.batching import (CACHE_KWARG, Decoding, batch_openings, forward_after, forward_rests, join, keep,
                            last_logprobs, left_pad, length_runs, poolable, prefill_prefixes, rows_attention,
                            shared_prefix_lengths, shared_prefix_order)
from rexft.config import RunConfig
from rexft.config import EvalConfig
from rexft.data import PromptFormat, encode_example, encode_prompt, letter_token_ids
from rexft.errors import RexftError
from rexft.metrics import bootstrap_ci, exact_match, rouge_l, wilson
from rexft.modeling import load_model, load_tokenizer
from rexft.splits import EvalSet, eval_set, examples_digest
from rexft.tasks.common import LETTERS, Example

log = logging.getLogger(__name__)
MAX_ROWS = 40  # tasks shown in a heatmap or bar chart before it summarises
DECODE_CHUNK = 4  # generate: tokens decoded between the moments rows leave and join the decoding batch


def attending_by_rows(method):
    """The method's forwards attend with ``batching.rows_sdpa``: decoding steps per group of rows, prefills on a
    CPU without copying shared key/value heads. Same results as the model's own SDPA."""
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with rows_attention(self.model):
            return method(self, *args, **kwargs)
    return wrapped


def dropped(example: Example) -> dict:
    """The record of an example whose prompt cannot fit data.max_length without cutting into it."""
    return {"task": example.task, "id": example.row, "dropped": True}


@dataclass
class Scorer:
    """Scores examples with one model; ``priors`` (n, k) is aligned with the examples scored."""

    model: torch.nn.Module
    tokenizer: object
    fmt: PromptFormat
    max_length: int
    batch_size: int = 16
    priors: torch.Tensor | None = None
    progress: bool = True
    row_state: Callable[[list[int]], None] | None = None  # called with each batch's example indices (per-row state)
    # first_token, generate: the prompts of one task share their opening tokens' KV cache (computed once per
    # batch). Exact only where the model computes the same for every row of a task: never with per-row
    # priors; a caller whose row_state differs within a task turns it off.
    share_prefixes: bool = True
    decode_batch_size: int = 64  # generate: rows decoding together (finished rows leave, prefilled ones join)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _batches(self, lengths: dict[int, int], order: list[int] | None = None):
        """Batches of example indices, longest first (``lengths``: index -> tokens), or in ``order``."""
        order = order or sorted(lengths, key=lambda i: -lengths[i])
        for start in range(0, len(order), self.batch_size):
            yield order[start:start + self.batch_size]

    def _set_prior(self, rows: list[int]) -> None:
        set_prior(self.model, None if self.priors is None else self.priors[rows].to(self.device))
        if self.row_state is not None:
            self.row_state(rows)

    def _forward(self, sequences: list[list[int]], rows: list[int], keep: int) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in left_pad(sequences, self.pad_id).items()}
        self._set_prior(rows)
        set_token_mask(self.model, batch["attention_mask"])
        return last_logprobs(self.model, batch, keep)

    def _openings(self, prompts: dict[int, list[int]], tasks: dict[int, str],
                  sizes: dict[int, int]) -> tuple[dict[int, int], list[int] | None]:
        """Where prompts may share their task's opening (``share_prefixes``, no per-row prior): how many
        tokens each shares, and the batching order (by ``sizes``) that keeps a task's rows together; else
        ({}, None)."""
        if not (self.share_prefixes and self.priors is None):
            return {}, None
        shared = shared_prefix_lengths(prompts, tasks)
        return shared, shared_prefix_order(sizes, tasks, shared)

    def _last_logprobs(self, index: list[int], prompts: dict[int, list[int]], shared: dict[int, int],
                       on_batch=None, heads: dict | None = None) -> torch.Tensor:
        """log-softmax at each row's last position (b, V): the batch's distinct openings once, then the rows'
        rests in runs of similar length (a batch keeps a task's rows together, whatever their lengths).
        ``on_batch`` gets the examples of each forward that logs routes; ``heads``: ``prefill_prefixes``'."""
        lengths = batch_openings(index, prompts, shared)
        if not any(lengths):
            logprobs = self._forward([prompts[i] for i in index], index, 1)[:, -1]
            if on_batch:
                on_batch(index)
            return logprobs
        self._set_prior(index)
        before = (lambda rows: self.row_state([index[r] for r in rows])) if self.row_state else None
        sequences = [prompts[i] for i in index]
        with route_logs_paused(self.model):  # a routing heatmap counts each row once, from the passes below
            openings = prefill_prefixes(self.model, [s[:n] for s, n in zip(sequences, lengths)], self.pad_id,
                                        before, split=True, heads=heads)
        out = None
        for run, output in forward_rests(self.model, sequences, lengths, openings, self.pad_id, 1,
                                         lambda run: self._set_prior([index[r] for r in run])):
            if on_batch:
                on_batch([index[r] for r in run])
            logprobs = output.logits[:, -1].float().log_softmax(-1)
            if out is None:
                out = logprobs.new_empty(len(index), logprobs.shape[-1])
            out[run] = logprobs
        return out

    @torch.inference_mode()
    @attending_by_rows
    def first_token(self, examples: list[Example], restricted: bool = True, on_batch=None) -> list[dict]:
        from tqdm.auto import tqdm

        max_options = max(len(e.options) for e in examples)
        prefix, letter_ids = letter_token_ids(self.tokenizer, self.fmt, max_options)
        prompts = {}
        for i, e in enumerate(examples):
            ids = encode_prompt(e, self.tokenizer, self.fmt, self.max_length, reserve=len(prefix) + 2)[0]
            if ids is not None:
                prompts[i] = ids + prefix
        results: list[dict] = [dropped(e) for e in examples]
        sizes = {i: len(p) for i, p in prompts.items()}
        shared, order = self._openings(prompts, {i: examples[i].task for i in prompts}, sizes)
        batches, heads = list(self._batches(sizes, order)), {}  # heads: the openings' common head, run once
        for index in tqdm(batches, desc="eval", disable=not self.progress, leave=False):
            logprobs = self._last_logprobs(index, prompts, shared, on_batch, heads)  # (b, V)
            for row, i in enumerate(index):
                example = examples[i]
                ids = letter_ids[: len(example.options)]
                scores = logprobs[row, ids]
                if restricted:
                    predicted = LETTERS[int(scores.argmax())]
                else:
                    top = int(logprobs[row].argmax())
                    predicted = LETTERS[ids.index(top)] if top in ids else None
                results[i] = {"task": example.task, "id": example.row, "gold": example.answer, "predicted": predicted,
                              "scores": [round(float(s), 5) for s in scores],
                              "nll": round(-float(scores[example.answer_index]), 5)}
        return results

    @torch.inference_mode()
    @attending_by_rows
    def loglik(self, examples: list[Example], on_batch=None) -> list[dict]:
        from tqdm.auto import tqdm

        pairs = []  # (example index, option index, context ids, continuation ids)
        for i, example in enumerate(examples):
            options = [self.tokenizer(self.fmt.answer_text(text), add_special_tokens=False).input_ids for text in example.options]
            longest = max(len(o) for o in options)
            context = encode_prompt(example, self.tokenizer, self.fmt, self.max_length, reserve=longest)[0]
            if context is not None:
                pairs += [(i, j, context, option) for j, option in enumerate(options)]
        sums = [[0.0] * len(e.options) for e in examples]
        batches = list(self._batches({k: len(p[2]) + len(p[3]) for k, p in enumerate(pairs)}))
        for index in tqdm(batches, desc="eval", disable=not self.progress, leave=False):
            chunk = [pairs[k] for k in index]
            keep = max(len(p[3]) for p in chunk) + 1
            logprobs = self._forward([p[2] + p[3] for p in chunk], [p[0] for p in chunk], keep)
            if on_batch:
                on_batch([p[0] for p in chunk])
            for row, (i, j, _, option) in enumerate(chunk):
                n = len(option)
                # positions -n-1 .. -2 predict the option's tokens
                predicted = logprobs[row, keep - n - 1: keep - 1]  # (n, V)
                sums[i][j] = float(predicted.gather(-1, torch.tensor(option, device=predicted.device)[:, None]).sum())
        scored = {p[0] for p in pairs}
        results = []
        for i, (example, scores) in enumerate(zip(examples, sums)):
            if i not in scored:
                results.append(dropped(example))
                continue
            normed = [s / max(1, len(o.encode())) for s, o in zip(scores, example.options)]
            results.append({"task": example.task, "id": example.row, "gold": example.answer,
                            "predicted": LETTERS[max(range(len(scores)), key=scores.__getitem__)],
                            "predicted_norm": LETTERS[max(range(len(normed)), key=normed.__getitem__)],
                            "scores": [round(s, 5) for s in scores],
                            "nll": round(-scores[example.answer_index] / max(1, len(example.options[example.answer_index].encode())), 5)})
        return results

    @torch.inference_mode()
    @attending_by_rows
    def target_nll(self, examples: list[Example], prior_rows: list[int] | None = None, on_batch=None) -> list[float | None]:
        """Mean nats per target token (the target text and EOS, as trained) under teacher forcing; None
        for an example that cannot fit data.max_length. ``prior_rows[i]``: example i's row of self.priors
        (default: i); ``on_batch`` is called with each batch's prior rows."""
        encoded = {i: r for i, r in enumerate(encode_example(e, self.tokenizer, self.fmt, self.max_length) for e in examples)
                   if r is not None}
        out: list[float | None] = [None] * len(examples)
        rows_of = prior_rows if prior_rows is not None else list(range(len(examples)))
        for index in self._batches({i: len(r["input_ids"]) for i, r in encoded.items()}):
            rows = [encoded[i] for i in index]
            targets = [r["input_ids"][r["prompt_length"]:] for r in rows]
            keep = max(len(t) for t in targets) + 1
            logprobs = self._forward([r["input_ids"] for r in rows], [rows_of[i] for i in index], keep)  # (b, keep, V)
            if on_batch:
                on_batch([rows_of[i] for i in index])
            for row, (i, target) in enumerate(zip(index, targets)):
                n = len(target)
                predicted = logprobs[row, keep - n - 1: keep - 1]  # positions predicting the target tokens
                picked = predicted.gather(-1, torch.tensor(target, device=predicted.device)[:, None])
                out[i] = round(-float(picked.sum()) / n, 5)
        return out

    def _prefill(self, index: list[int], prompts: dict[int, list[int]], shared: dict[int, int],
                 targets: dict[int, list[int]], on_batch=None, aligned: bool = True,
                 heads: dict | None = None) -> tuple[dict[int, float], list[Decoding]]:
        """Fill the KV cache of a batch's prompts but their last token (generate() feeds that itself): each
        distinct shared opening once, then, in runs of rows of similar length, every row's remaining prompt
        tokens followed by its target when it has one (its target NLL, mean nats per token). ``aligned``:
        each row's target right after its prompt, rows left-padded as a whole (no padding between prompts
        and targets; the rows' prompts end at different columns, which ``join`` aligns); else targets
        right-padded after the left-padded prompts and the cache cropped to them (for caches ``join``
        cannot rebuild); ``heads``: ``prefill_prefixes``'. Returns the NLLs and the rows ready for generate(),
        one part per run."""
        before = (lambda rows: self.row_state([index[r] for r in rows])) if self.row_state else None
        lengths = batch_openings(index, prompts, shared)
        openings = None
        if any(lengths):
            with route_logs_paused(self.model):  # a routing heatmap counts each row once, from the pass below
                openings = prefill_prefixes(self.model, [prompts[i][:n] for i, n in zip(index, lengths)], self.pad_id,
                                            before, split=aligned, heads=heads)
        nlls, parts = {}, []
        sizes = [len(prompts[i]) - n + len(targets.get(i, ())) for i, n in zip(index, lengths)]
        for run in length_runs(sizes):
            rows = [index[r] for r in run]
            self._set_prior(rows)
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
            out = forward_after(self.model, prefix, batch, longest + 1)
            if on_batch:
                on_batch(rows)
            if longest:  # the logits predicting each real target token, and only those, through the softmax
                labels = torch.zeros((len(rows), longest), dtype=torch.long)
                real = torch.zeros_like(labels, dtype=torch.bool)
                for row, answer in enumerate(answers):
                    at = slice(longest - len(answer), longest) if aligned else slice(0, len(answer))
                    labels[row, at], real[row, at] = torch.tensor(answer, dtype=torch.long), True
                real = real.to(self.device)
                token_nll = torch.nn.functional.cross_entropy(out.logits[:, :-1][real].float(), labels.to(self.device)[real],
                                                              reduction="none")
                sums = torch.zeros(len(rows), device=self.device).index_add_(0, real.nonzero()[:, 0], token_nll)
                nlls.update((i, round(float(sums[row]) / len(answers[row]), 5)) for row, i in enumerate(rows) if answers[row])
            cache = out[CACHE_KWARG]  # the output field is named like generate()'s argument
            ids, mask = batch["input_ids"], batch["attention_mask"]
            if not aligned:  # keep the prompts but their last position
                cache.crop(-(longest + 1))
                ids, mask = ids[:, : ids.shape[1] - longest], mask[:, : mask.shape[1] - longest]
            if prefix is not None:
                ids, mask = torch.cat([prefix.input_ids, ids], 1), torch.cat([prefix.attention_mask, mask], 1)
            ends = [ids.shape[1] - len(answer) for answer in answers] if aligned else None
            parts.append(Decoding(rows, ids, mask, cache, [0] * len(rows), ends))
        return nlls, parts

    @torch.inference_mode()
    @attending_by_rows
    def generate(self, examples: list[Example], settings: EvalConfig, on_batch=None) -> list[dict]:
        """Batched decoding with generate(); each row scored by ROUGE-L and exact match against its references,
        and by its target NLL. Greedy or sampled with one sequence per row, the prompts' KV cache is filled
        here (``_prefill``: a task's shared opening once per batch, each row's prompt and target in one pass
        that also gives the target NLL) and up to ``decode_batch_size`` rows decode together: every
        ``DECODE_CHUNK`` tokens finished rows leave and newly prefilled ones join. ``on_batch`` is called
        with the examples of each forward that logs routes (one per example)."""
        from tqdm.auto import tqdm

        prompts, targets = {}, {}
        for i, example in enumerate(examples):
            row = encode_example(example, self.tokenizer, self.fmt, self.max_length)
            if row is not None:
                prompts[i], targets[i] = row["input_ids"][: row["prompt_length"]], row["input_ids"][row["prompt_length"]:]
            else:  # the target does not fit beside the prompt: generate anyway, no target NLL
                ids = encode_prompt(example, self.tokenizer, self.fmt, self.max_length)[0]
                if ids is not None:
                    prompts[i] = ids
        config = self._generation_config(settings)
        tasks = {i: examples[i].task for i in prompts}
        sizes = {i: len(p) + len(targets.get(i, ())) for i, p in prompts.items()}
        shared, order = self._openings(prompts, tasks, sizes) if settings.num_beams == 1 else ({}, None)
        batches = list(self._batches(sizes, order))
        bar = tqdm(total=len(prompts), desc="generate", disable=not self.progress, leave=False)
        if settings.num_beams > 1:
            texts = self._generate_beams(batches, prompts, config, settings, bar)
            nlls = dict(zip(list(targets), self.target_nll([examples[i] for i in targets], list(targets), on_batch)))
        else:
            texts, nlls = self._decode(batches, prompts, targets, shared, config, settings, on_batch, bar)
        bar.close()
        results = []
        for i, example in enumerate(examples):
            if i not in texts:
                results.append(dropped(example))
                continue
            references = example.references or [example.answer]
            results.append({"task": example.task, "id": example.row, "prediction": texts[i], "references": references,
                            "rouge_l": round(rouge_l(texts[i], references), 5),
                            "exact_match": exact_match(texts[i], references), "target_nll": nlls.get(i)})
        return results

    def _generation_config(self, settings: EvalConfig):
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                                  num_beams=settings.num_beams, eos_token_id=self.tokenizer.eos_token_id,
                                  pad_token_id=self.pad_id)
        if settings.do_sample:
            config.temperature, config.top_p = settings.temperature, settings.top_p
        else:  # the model's own generation_config may carry sampling defaults: greedy means none of them
            config.temperature, config.top_p, config.top_k = None, None, None
        if settings.stop:
            config.stop_strings = list(settings.stop)
        return config

    def _decode(self, batches, prompts, targets, shared, config, settings: EvalConfig, on_batch, bar):
        """One sequence per row: batches prefilled in turn, their rows decoding together in chunks of
        ``DECODE_CHUNK`` tokens; after each chunk, finished rows leave and prefilled batches join while
        there is room. Returns (texts, target NLLs) by example index."""
        texts, nlls = {}, {}
        queue = list(reversed(batches))
        pool: Decoding | None = None
        waiting: list[Decoding] = []  # prefilled rows not decoding yet, where caches cannot be joined
        pooled = bool(batches) and self._joinable_cache(prompts[batches[0][0]][:1])
        heads: dict = {}  # the openings' common head, run once for every batch
        while queue or waiting or pool is not None:
            if pool is None and waiting:
                pool = waiting.pop(0)
            elif queue and (pool is None or pooled and len(pool) + len(queue[-1]) <= self.decode_batch_size):
                parts, rows = [], 0 if pool is None else len(pool)  # room for a batch: refill
                while queue and (not parts and not rows or rows + len(queue[-1]) <= self.decode_batch_size):
                    batch_nlls, prefilled = self._prefill(queue.pop(), prompts, shared, targets, on_batch, pooled, heads)
                    nlls.update(batch_nlls)
                    parts += prefilled
                    rows += sum(map(len, prefilled))
                    if not pooled:  # e.g. sliding-window caches: each part decodes on its own, to its end
                        break
                if pooled:
                    pool = join(pool, parts, self.pad_id, self.decode_batch_size, settings.max_new_tokens)
                else:
                    waiting += parts
                    pool = waiting.pop(0)
            self._set_prior(pool.rows)  # stays set for every decoding step
            set_token_mask(self.model, None)
            budget = max(settings.max_new_tokens - n for n in pool.generated)
            config.max_new_tokens = min(DECODE_CHUNK, budget) if pooled else budget
            width = pool.input_ids.shape[1]
            with route_logs_paused(self.model):
                out = self.model.generate(input_ids=pool.input_ids, attention_mask=pool.attention_mask,
                                          **{CACHE_KWARG: pool.cache}, generation_config=config,
                                          tokenizer=self.tokenizer if settings.stop else None)
            steps = out.shape[1] - width
            pool.input_ids = out
            pool.attention_mask = torch.cat([pool.attention_mask, pool.attention_mask.new_ones(len(pool), steps)], 1)
            going = []
            for row, (i, before) in enumerate(zip(pool.rows, pool.generated)):
                pool.generated[row] = before + steps
                tokens = out[row, out.shape[1] - pool.generated[row]:][: settings.max_new_tokens].tolist()
                if self._finished(tokens, settings):
                    texts[i] = self.decode(tokens, settings.stop)
                    bar.update()
                else:
                    going.append(row)
            pool = keep(pool, going)
        return texts, nlls

    def _joinable_cache(self, token: list[int]) -> bool:
        """Whether this model's KV cache lets rows be joined and dropped (``batching.poolable``): one token's probe."""
        self._set_prior([0])
        set_token_mask(self.model, None)
        with route_logs_paused(self.model):
            probe = self.model(input_ids=torch.tensor([token], device=self.device), use_cache=True, logits_to_keep=1)
        return poolable(probe[CACHE_KWARG])

    def _finished(self, tokens: list[int], settings: EvalConfig) -> bool:
        """Whether a row's generated tokens end it: EOS, max_new_tokens, or a stop string in the text."""
        if len(tokens) >= settings.max_new_tokens or self.tokenizer.eos_token_id in tokens:
            return True
        return bool(settings.stop) and any(m in self.tokenizer.decode(tokens, skip_special_tokens=True) for m in settings.stop)

    def _generate_beams(self, batches, prompts, config, settings: EvalConfig, bar) -> dict[int, str]:
        """Beam search: each batch of whole prompts through generate() (beams repeat each row's prior). Routes
        are logged by the target NLL's pass, not here."""
        texts = {}
        for index in batches:
            batch = {k: v.to(self.device) for k, v in left_pad([prompts[i] for i in index], self.pad_id).items()}
            self._set_prior(index)
            set_token_mask(self.model, None)
            with route_logs_paused(self.model):
                output = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                             generation_config=config, tokenizer=self.tokenizer if settings.stop else None)
            width = batch["input_ids"].shape[1]
            for row, i in enumerate(index):
                texts[i] = self.decode(output[row, width:].tolist(), settings.stop)
            bar.update(len(index))
        return texts

    def decode(self, tokens: list[int], stop: list[str]) -> str:
        """New tokens up to the first EOS, as text cut before the first stop string."""
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos in tokens:
            tokens = tokens[: tokens.index(eos)]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for marker in stop:
            text = text.split(marker, 1)[0]
        return text.strip()


# ----------------------------------------------------------------------------------------------- metrics
def summarize(predictions: list[dict], tasks: list[str], unseen: set[str] = frozenset(), resamples: int = 1000) -> dict:
    """Per task: accuracy (choice) or ROUGE-L / exact match / target NLL (generative), with 95% intervals;
    macro means over held-in tasks, and over unseen tasks apart. Dropped examples are counted, not scored."""
    by_task: dict[str, list[dict]] = {t: [] for t in tasks}
    for p in predictions:
        by_task[p["task"]].append(p)
    out = {"tasks": {}}
    for task in tasks:
        rows = [p for p in by_task[task] if not p.get("dropped")]
        entry: dict = {"n": len(rows), "dropped": len(by_task[task]) - len(rows), "unseen": task in unseen}
        if rows and "rouge_l" in rows[0]:
            entry["kind"] = "generate"
            for metric in ("rouge_l", "exact_match"):
                values = [p[metric] for p in rows]
                entry[metric] = round(sum(values) / len(values), 4)
                entry[f"{metric}_ci95"] = bootstrap_ci([values], resamples)
            nlls = [p["target_nll"] for p in rows if p.get("target_nll") is not None]
            entry["target_nll"] = round(sum(nlls) / len(nlls), 4) if nlls else None
        elif rows:
            correct = sum(p["predicted"] == p["gold"] for p in rows)
            entry.update({"kind": "choice", "accuracy": round(correct / len(rows), 4), "ci95": wilson(correct, len(rows)),
                          "nll": round(sum(p["nll"] for p in rows) / len(rows), 4)})
            if "predicted_norm" in rows[0]:
                entry["accuracy_norm"] = round(sum(p["predicted_norm"] == p["gold"] for p in rows) / len(rows), 4)
        out["tasks"][task] = entry
    for group, held in (("", False), ("unseen_", True)):
        scored = {t: e for t, e in out["tasks"].items() if e["n"] and e["unseen"] == held}
        choice = [e for e in scored.values() if e["kind"] == "choice"]
        generative = {t: e for t, e in scored.items() if e["kind"] == "generate"}
        if choice or not held:
            out[f"{group}mean_accuracy"] = round(sum(e["accuracy"] for e in choice) / len(choice), 4) if choice else None
            out[f"{group}mean_nll"] = round(sum(e["nll"] for e in choice) / len(choice), 4) if choice else None
        if generative:
            for metric in ("rouge_l", "exact_match"):
                out[f"{group}mean_{metric}"] = round(sum(e[metric] for e in generative.values()) / len(generative), 4)
                groups = [[p[metric] for p in by_task[t] if not p.get("dropped")] for t in generative]
                out[f"{group}mean_{metric}_ci95"] = bootstrap_ci(groups, resamples)
            nlls = [e["target_nll"] for e in generative.values() if e["target_nll"] is not None]
            out[f"{group}mean_target_nll"] = round(sum(nlls) / len(nlls), 4) if nlls else None
    return out


def _ci(pair: list[float]) -> str:
    return f"{pair[0]:.3f}-{pair[1]:.3f}"


def results_table(results: dict) -> str:
    """Markdown: choice tasks (accuracy) and generative tasks (ROUGE-L, EM, target NLL), held-in first,
    then unseen tasks, each block sorted by task name with its macro mean."""
    blocks = []
    for held, title in ((False, "held-in"), (True, "unseen")):
        tasks = {t: e for t, e in sorted(results["tasks"].items()) if e["unseen"] == held and e["n"]}
        prefix = "unseen_" if held else ""
        choice = {t: e for t, e in tasks.items() if e["kind"] == "choice"}
        generative = {t: e for t, e in tasks.items() if e["kind"] == "generate"}
        if choice:
            lines = [f"| {title} choice task | n | accuracy | 95% CI | answer NLL |", "|---|---|---|---|---|"]
            lines += [f"| {t} | {e['n']} | {e['accuracy']:.3f} | {_ci(e['ci95'])} | {e['nll']:.3f} |" for t, e in choice.items()]
            lines.append(f"| **mean ({len(choice)} task{'s' * (len(choice) != 1)})** | {sum(e['n'] for e in choice.values())} | "
                         f"**{results[prefix + 'mean_accuracy']:.3f}** | | {results[prefix + 'mean_nll']:.3f} |")
            blocks.append("\n".join(lines))
        if generative:
            lines = [f"| {title} generative task | n | ROUGE-L | 95% CI | exact match | 95% CI | target NLL |",
                     "|---|---|---|---|---|---|---|"]
            lines += [f"| {t} | {e['n']} | {e['rouge_l']:.3f} | {_ci(e['rouge_l_ci95'])} | {e['exact_match']:.3f} | "
                      f"{_ci(e['exact_match_ci95'])} | {e['target_nll']:.3f} |" for t, e in generative.items()]
            lines.append(f"| **mean ({len(generative)} task{'s' * (len(generative) != 1)})** | {sum(e['n'] for e in generative.values())} | "
                         f"**{results[prefix + 'mean_rouge_l']:.3f}** | {_ci(results[prefix + 'mean_rouge_l_ci95'])} | "
                         f"**{results[prefix + 'mean_exact_match']:.3f}** | {_ci(results[prefix + 'mean_exact_match_ci95'])} | "
                         f"{results[prefix + 'mean_target_nll']:.3f} |")
            blocks.append("\n".join(lines))
    dropped = sum(e["dropped"] for e in results["tasks"].values())
    if dropped:
        blocks.append(f"({dropped} examples did not fit data.max_length and were not scored; see results.json)")
    empty = sorted(t for t, e in results["tasks"].items() if not e["n"] and not e["dropped"])
    if empty:
        blocks.append(f"(no held-out rows to score for {', '.join(empty)}: their validation split has none of their rows)")
    return "\n\n".join(blocks)


def summary_lines(results: dict) -> str:
    """The macro means alone: what the console shows when there are too many tasks for a table."""
    keys = [k for k in results if k.startswith(("mean_", "unseen_mean_")) and not k.endswith("_ci95") and results[k] is not None]
    return "\n".join(f"{k}: {results[k]:.4f}" for k in keys)


# -------------------------------------------------------------------------------------------------- stage
def eval_examples(cfg: RunConfig) -> EvalSet:
    """Held-in examples (eval.tasks or all of data.tasks) and unseen-task examples (eval.unseen_tasks), as
    `rexft data` recorded them (rexft/splits.py)."""
    return eval_set(cfg)


def load_eval_model(cfg: RunConfig):
    """(model, tokenizer, adapter config or None, description). A merged export, or base [+ adapter]."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.eval.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(cfg.eval.model)
        if not (path / "config.json").is_file():
            raise RexftError(f"eval.model={path} is not a model directory (no config.json)")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).to(device)
        return model.eval(), tokenizer, None, f"merged model {path}"
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, len(tokenizer), device)
    adapter_dir = cfg.path / "adapter"
    if not cfg.eval.use_adapter:
        return model.eval(), tokenizer, None, f"base model {cfg.model.name_or_path}"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise RexftError(f"no adapter at {adapter_dir}: run `rexft train` with this recipe first, "
                         "or pass eval.use_adapter=false to evaluate the base model")
    load_adapter(model, adapter_dir)
    return model.to(device).eval(), tokenizer, read_adapter_config(adapter_dir), f"adapter {adapter_dir}"


def adapter_priors(adapter_dir: Path, adapter_config: dict, prompts: list[str], cfg: RunConfig) -> torch.Tensor | None:
    """Priors for eval prompts from the centroids saved with the adapter (None if it takes none)."""
    from safetensors.torch import load_file

    from rexft.prior import priors_from

    spec = adapter_config["adapter"]
    if spec["type"] != "trex" or not spec["use_prior"]:
        return None
    meta = adapter_config.get("prior")
    centroids_path = adapter_dir / "prior_centroids.safetensors"
    if meta is None or not centroids_path.is_file():
        raise RexftError(f"adapter at {adapter_dir} uses a prior but carries no prior_centroids.safetensors")
    return priors_from(prompts, load_file(str(centroids_path))["centroids"], meta, cfg.prior)


def scoring_fingerprint(cfg: RunConfig) -> dict:
    """What an example's score depends on besides the example: the adapter's weights and the scoring
    settings. merge-export reuses ``rexft eval``'s predictions for its fidelity table when these match."""
    import hashlib

    from rexft.adapters import ADAPTER_WEIGHTS

    weights = cfg.path / "adapter" / ADAPTER_WEIGHTS
    return {"adapter_sha256": hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None,
            "model": cfg.model.name_or_path, "max_length": cfg.data.max_length, "protocol": cfg.eval.protocol,
            "restricted": cfg.eval.restricted, "max_new_tokens": cfg.eval.max_new_tokens, "stop": list(cfg.eval.stop),
            "do_sample": cfg.eval.do_sample, "num_beams": cfg.eval.num_beams}


def reusable_predictions(cfg: RunConfig) -> dict[tuple[str, object], dict]:
    """``rexft eval``'s predictions of the run's adapter, by (task, id), when they were scored with the
    adapter as it is now and the same settings (greedy decoding only); else none."""
    out = cfg.path / cfg.eval.output
    if cfg.eval.do_sample or not (out / "results.json").is_file() or not (out / "predictions.jsonl").is_file():
        return {}
    if json.loads((out / "results.json").read_text()).get("fingerprint") != scoring_fingerprint(cfg):
        return {}
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines() if line.strip()]
    return {(row["task"], row["id"]): row for row in rows}


def score_examples(scorer: Scorer, examples: list[Example], cfg: EvalConfig, on_batch=None) -> list[dict]:
    """Each example with its task's protocol; predictions in the order of ``examples``."""
    choice = [i for i, e in enumerate(examples) if e.kind == "choice"]
    generative = [i for i, e in enumerate(examples) if e.kind == "generate"]
    predictions: list[dict | None] = [None] * len(examples)
    for index, run in ((choice, "choice"), (generative, "generate")):
        if not index:
            continue
        # The subset's own scorer: priors and per-row state follow its rows back to ``examples``.
        part = replace(scorer, priors=None if scorer.priors is None else scorer.priors[index],
                       row_state=(lambda rows, index=index: scorer.row_state([index[r] for r in rows]))
                       if scorer.row_state else None)
        subset = [examples[i] for i in index]
        relay = (lambda rows, index=index: on_batch([index[r] for r in rows])) if on_batch else None
        if run == "choice":
            scored = (part.first_token(subset, cfg.restricted, relay) if cfg.protocol == "first_token"
                      else part.loglik(subset, relay))
        else:
            scored = part.generate(subset, cfg, relay)
        for i, row in zip(index, scored):
            predictions[i] = row
    return predictions


def evaluate(cfg: RunConfig) -> Path:
    """``rexft eval``: returns run_dir/eval (or run_dir/<eval.output>)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from rexft.rundir import atomic_write_text, write_json, write_jsonl

    state = PartialState(cpu=not torch.cuda.is_available())
    chosen = eval_examples(cfg)
    examples, sources, unseen = chosen.examples, chosen.sources, chosen.unseen
    model, tokenizer, adapter_config, description = load_eval_model(cfg)
    priors = None
    if adapter_config is not None:
        priors = adapter_priors(cfg.path / "adapter", adapter_config, [e.prompt for e in examples], cfg)
    mine = examples[state.process_index::state.num_processes]  # distributed: each process scores a shard
    if priors is not None:
        priors = priors[state.process_index::state.num_processes]
    layer = routing_layer(model, cfg.eval.routing_layer)
    if layer is not None:
        layer[1].route_log = []
    order: list[int] = []
    scorer = Scorer(model, tokenizer, PromptFormat.for_model(tokenizer, cfg.model), cfg.data.max_length,
                    cfg.eval.batch_size, priors, progress=state.is_main_process,
                    decode_batch_size=cfg.eval.decode_batch_size)
    on_batch = (lambda index: order.extend(index)) if layer is not None else None
    predictions = score_examples(scorer, mine, cfg.eval, on_batch)
    predictions = gather_object(predictions) if state.num_processes > 1 else predictions
    if not state.is_main_process:
        return cfg.path / cfg.eval.output
    tasks = chosen.tasks
    predictions += [dropped(e) for e in chosen.not_scored]  # too long for `rexft data`: counted, not scored
    results = summarize(predictions, tasks, unseen, cfg.eval.bootstrap)
    for task, digest in examples_digest(examples).items():
        results["tasks"][task]["examples"] = digest
    results.update({"protocol": cfg.eval.protocol, "restricted": cfg.eval.restricted, "model": description,
                    "eval_source": sources, "generation": {"max_new_tokens": cfg.eval.max_new_tokens, "stop": cfg.eval.stop,
                                                           "do_sample": cfg.eval.do_sample, "num_beams": cfg.eval.num_beams}})
    if adapter_config is not None:
        results["fingerprint"] = scoring_fingerprint(cfg)
    out = cfg.path / cfg.eval.output
    write_json(out / "results.json", results)
    write_jsonl(out / "predictions.jsonl", predictions)
    table = results_table(results)
    protocols = sorted({"generate" if e.kind == "generate" else cfg.eval.protocol for e in examples})
    atomic_write_text(out / "results.md", f"{description}, protocols {', '.join(protocols)}\n\n{table}\n")
    if layer is not None and state.num_processes == 1:
        routing_heatmap(layer, order, mine, tasks, out / "routing.png")
    shown = table if len(tasks) <= 30 else f"{summary_lines(results)}\n({len(tasks)} tasks: the per-task table is in {out / 'results.md'})"
    print(f"\n{description} — protocols {', '.join(protocols)}\n{shown}")
    held = sorted(t for t, s in sources.items() if s != "validation")
    if held:
        listed = ", ".join(held[:8]) + (f" and {len(held) - 8} more" if len(held) > 8 else "")
        print(f"(evaluated on rows held out from training for {listed}: the tasks have no separate split)")
    return out


def routing_layer(model, index: int):
    """(name, layer) of the first mixture adapter in transformer block ``index`` (-1: the last block)."""
    layers = [(n, m) for n, m in adapter_layers(model).items() if m.is_mixture]
    if not layers:
        return None
    blocks = sorted({int(part) for n, _ in layers for part in n.split(".") if part.isdigit()})
    if not blocks:
        return layers[0]
    block = blocks[index] if -len(blocks) <= index < len(blocks) else blocks[-1]
    return next((n, m) for n, m in layers if f".{block}." in f".{n}.")


def routing_heatmap(layer, order: list[int], examples: list[Example], tasks: list[str], path: Path) -> None:
    """Mean routing weight per task x expert, from the per-example routes the layer logged."""
    from rexft.prior import heatmap

    name, module = layer
    logged, module.route_log = module.route_log, None
    if not logged:
        return
    routes = torch.cat(logged)  # (n, E) in batch order
    by_task = {t: [] for t in tasks}
    for route, index in zip(routes, order):
        by_task[examples[index].task].append(route)
    shown = [t for t in tasks if by_task[t]]
    means = {t: torch.stack(by_task[t]).mean(0) for t in shown}
    title = f"mean routing weight at {name}"
    if len(shown) > MAX_ROWS:  # keep it legible: the tasks whose routing departs most from the average
        overall = torch.stack(list(means.values())).mean(0)
        shown = sorted(shown, key=lambda t: -float((means[t] - overall).abs().sum()))[:MAX_ROWS]
        title += f"\n{MAX_ROWS} of {len(means)} tasks: those routed most unlike the mean"
    shown.sort(key=lambda t: (int(means[t].argmax()), t))  # grouped by their favourite expert
    heatmap([means[t].tolist() for t in shown], shown, [str(e) for e in range(routes.shape[1])], title, path, "task", "expert")


# ------------------------------------------------------------------------------------------------ compare
def headline(entry: dict) -> tuple[str, float | None]:
    """The metric a task is compared by: accuracy (choice) or ROUGE-L (generative)."""
    if entry.get("kind") == "generate":
        return "ROUGE-L", entry.get("rouge_l")
    return "accuracy", entry.get("accuracy")


MEAN_LABELS = {"mean_accuracy": "mean accuracy", "mean_rouge_l": "mean ROUGE-L", "mean_exact_match": "mean EM",
               "mean_target_nll": "mean target NLL", "unseen_mean_accuracy": "unseen mean accuracy",
               "unseen_mean_rouge_l": "unseen mean ROUGE-L", "unseen_mean_exact_match": "unseen mean EM",
               "unseen_mean_target_nll": "unseen mean target NLL"}


def compare_runs(run_dirs: list[Path], out: Path | None = None) -> str:
    """``rexft eval compare DIR...``: side-by-side table (accuracy for choice tasks; ROUGE-L, EM and target
    NLL for generative ones; held-in and unseen means apart), and compare.{md,png} written to the runs'
    common parent folder (or ``out``). Past 40 tasks the chart plots each run's per-task scores sorted."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not run_dirs:
        raise RexftError("usage: rexft eval compare RUN_DIR [RUN_DIR ...]")
    runs = {}
    for directory in run_dirs:
        path = directory / "results.json" if (directory / "results.json").is_file() else directory / "eval" / "results.json"
        if not path.is_file():
            raise RexftError(f"no eval results at {directory} (run `rexft eval` first)")
        runs[str(directory)] = json.loads(path.read_text())
    out = Path(out) if out is not None else Path(os.path.commonpath([str(d.resolve()) for d in run_dirs]))
    tasks = sorted(dict.fromkeys(t for r in runs.values() for t in r["tasks"]))

    def cell(r: dict, task: str) -> str:
        entry = r["tasks"].get(task)
        if not entry or not entry.get("n"):
            return "-"
        if entry.get("kind") == "generate":
            return f"{entry['rouge_l']:.3f} / {entry['exact_match']:.3f} / {entry['target_nll']:.3f} (n={entry['n']})"
        return f"{entry['accuracy']:.3f} (n={entry['n']})"

    def differs(task: str) -> bool:
        """The runs scored different examples of the task (other rows, another eval.limit)."""
        scored = [(e.get("n"), e.get("examples")) for e in (r["tasks"].get(task) for r in runs.values()) if e]
        return len(set(scored)) > 1

    lines = ["| task (accuracy, or ROUGE-L / EM / target NLL) | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    lines += [f"| {task}{' (unseen)' if any(r['tasks'].get(task, {}).get('unseen') for r in runs.values()) else ''}"
              f"{' †' if differs(task) else ''} | " + " | ".join(cell(r, task) for r in runs.values()) + " |" for task in tasks]
    means = [k for k in MEAN_LABELS if any(r.get(k) is not None for r in runs.values())]
    footer = [f"| **{MEAN_LABELS[k]}** | " + " | ".join(f"**{r[k]:.3f}**" if r.get(k) is not None else "-" for r in runs.values())
              + " |" for k in means]
    if any(differs(task) for task in tasks):
        footer.append("\n† the runs scored different examples of this task (other held-out rows or eval.limit): "
                      "its scores are not comparable")
    table = "\n".join(lines + footer)
    print(table if len(tasks) <= 30 else "\n".join(lines[:2] + footer) + f"\n({len(tasks)} tasks: see compare.md)")
    fig, ax = plt.subplots(figsize=(max(8, min(len(tasks), MAX_ROWS) * 0.8), 4.5))
    if len(tasks) <= MAX_ROWS:
        width = 0.8 / len(runs)
        for k, (name, r) in enumerate(runs.items()):
            values = [headline(r["tasks"].get(t, {}))[1] or 0 for t in tasks]
            ax.bar([i + k * width for i in range(len(tasks))], values, width, label=Path(name).name or name)
        ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(tasks))], tasks, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("accuracy (choice) / ROUGE-L (generative)")
    else:
        for name, r in runs.items():
            values = sorted(headline(e)[1] or 0 for e in r["tasks"].values() if e.get("n"))
            ax.plot(range(len(values)), values, marker=".", linestyle="-", label=Path(name).name or name)
        ax.set_xlabel(f"tasks, each run sorted by its own score ({len(tasks)} tasks)")
        ax.set_ylabel("accuracy (choice) / ROUGE-L (generative)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)
    plt.close(fig)
    (out / "compare.md").write_text(table + "\n")
    print(f"wrote {out / 'compare.md'} and {out / 'compare.png'}")
    return table
