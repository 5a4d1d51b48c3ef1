"""Data stage: raw records -> examples -> training mixture and eval sets -> token ids.

    records: built-in tasks (hub or <local_dir>/<task>/<split>.jsonl, one loader each under rexft/tasks/)
             and the user's sources (data.sources: local files or hub datasets, see rexft/sources.py)
      -> Example: choice (prompt, options, gold index) or generative (prompt or messages, target text)
      -> train / eval split per task (rexft/splits.py fallback_split: no train split: disjoint parts of
         validation; no validation split: a held-out part of train)
      -> mixture (caps, proportional or temperature sampling; seeded)
      -> token ids with the chat template (or plain template), loss on the answer / target tokens only;
         context (a passage, an input, old turns) is trimmed to fit data.max_length, and an example that
         still does not fit is dropped and counted, never cut into

``rexft data`` writes run_dir/data/{train,validation}.jsonl, the split record split.json (rexft/splits.py: what
every later stage trains on and scores), stats.json and stats.md, and prints the table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from rexft.config import DataConfig, ModelConfig, RunConfig
from rexft.errors import RexftError
from rexft.splits import TaskSplit, mixture
from rexft.tasks.common import LETTERS, Example

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------ tokenizing
@dataclass
class PromptFormat:
    """How a prompt becomes text: the tokenizer's chat template, else ``plain_template``. A harness-style
    example (``Example.prompt_style``) is always its prompt as it is, with the tokenizer's own special
    tokens, and its options follow it as written: what lm-eval's ``hf`` model feeds for a zero-shot request."""

    chat: bool
    plain_template: str

    @classmethod
    def for_model(cls, tokenizer, cfg: ModelConfig) -> "PromptFormat":
        return cls(bool(cfg.use_chat_template and getattr(tokenizer, "chat_template", None)), cfg.plain_template)

    def of(self, example: Example) -> "PromptFormat":
        """The format this example is rendered in: its own for harness-style examples, else this one."""
        return HARNESS_FORMAT if example.prompt_style == "harness" else self

    @staticmethod
    def target(example: Example) -> str:
        """What follows the prompt in training: a chat-style choice example's gold letter, a harness-style
        one's gold continuation, a generative example's target text."""
        if example.kind == "generate":
            return example.target
        return example.options[example.gold] if example.prompt_style == "harness" else example.letter

    @staticmethod
    def messages(example: Example) -> list[dict]:
        """The turns the model answers: a chat example's own, else [system], user prompt."""
        if example.messages is not None:
            return example.messages
        system = [{"role": "system", "content": example.system}] if example.system else []
        return system + [{"role": "user", "content": example.prompt}]

    def render(self, tokenizer, messages: list[dict], generation_prompt: bool = True) -> str:
        if self.chat:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        if len(messages) == 1:
            return self.plain_template.format(prompt=messages[0]["content"])
        turns = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
        return self.plain_template.format(prompt=turns) if generation_prompt else turns

    def answer_text(self, text: str) -> str:
        """The target as it follows the prompt (a letter for choice tasks); a harness-style continuation
        brings its own leading space."""
        return text if self.chat or text[:1].isspace() else f" {text}"

    def fingerprint(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


HARNESS_FORMAT = PromptFormat(chat=False, plain_template="{prompt}")


def letter_token_ids(tokenizer, fmt: PromptFormat, n: int) -> tuple[list[int], list[int]]:
    """(shared prefix, letter ids): the answer letters' tokens after the prompt. Tokenizers that split
    " A" into a space and "A" share a prefix; first_token scoring appends it to the prompt and compares
    the letters at the next position."""
    encoded = [tokenizer(fmt.answer_text(letter), add_special_tokens=False).input_ids for letter in LETTERS[:n]]
    prefix = 0
    while all(len(e) > prefix + 1 for e in encoded) and len({e[prefix] for e in encoded}) == 1:
        prefix += 1
    ids = [e[prefix] for e in encoded]
    if len(set(ids)) != n:
        raise RexftError(f"the tokenizer maps answer letters {LETTERS[:n]} to non-distinct tokens {encoded}")
    return encoded[0][:prefix], ids


def message_tokens(tokenizer, fmt: PromptFormat, messages: list[dict], generation_prompt: bool = True) -> list[int]:
    # chat templates carry their own special tokens
    return tokenizer(fmt.render(tokenizer, messages, generation_prompt), add_special_tokens=not fmt.chat).input_ids


def _without_context_tail(example: Example, context_ids: list[int], keep: int, tokenizer) -> Example:
    """The example with only the first ``keep`` tokens of its context (marked " ..."), or none of it."""
    start, end = example.context_start, example.context_start + example.context_chars
    kept = tokenizer.decode(context_ids[:keep]).rstrip() + " ...\n" if keep > 0 else ""
    return replace(example, prompt=example.prompt[:start] + kept + example.prompt[end:], context_chars=len(kept))


def encode_prompt(example: Example, tokenizer, fmt: PromptFormat, max_length: int, reserve: int = 0) -> tuple[list[int] | None, bool]:
    """(prompt token ids of at most ``max_length - reserve``, truncated?). Only context is given up: the
    passage / input (trimmed from its end), or a conversation's oldest turns. None when the rest (question,
    options, the last user turn) cannot fit even so: the example is dropped, never cut into."""
    budget = max_length - reserve
    fmt = fmt.of(example)
    ids = message_tokens(tokenizer, fmt, fmt.messages(example))
    if len(ids) <= budget:
        return ids, False
    if example.messages is not None:  # chat: drop the oldest turns (after a system turn) until it fits
        messages = example.messages
        head = 1 if messages[0]["role"] == "system" else 0
        while len(ids) > budget and len(messages) > head + 1:
            drop = head + 1
            while drop < len(messages) - 1 and messages[drop]["role"] != "user":
                drop += 1  # keep the conversation starting with a user turn
            messages = messages[:head] + messages[drop:]
            ids = message_tokens(tokenizer, fmt, messages)
        return (ids, True) if len(ids) <= budget else (None, True)
    if example.context_chars:  # cut the context's tail; re-tokenizing can shift a token or two, so retry
        start = example.context_start
        context_ids = tokenizer(example.prompt[start:start + example.context_chars], add_special_tokens=False).input_ids
        cut = len(ids) - budget + 4
        while len(ids) > budget and cut <= len(context_ids) + 4:
            trimmed = _without_context_tail(example, context_ids, len(context_ids) - cut, tokenizer)
            ids = message_tokens(tokenizer, fmt, fmt.messages(trimmed))
            cut += max(1, len(ids) - budget)
    return (ids, True) if len(ids) <= budget else (None, True)


def plain_assistant_spans(tokenizer, fmt: PromptFormat, messages: list[dict], ids: list[int]) -> list[tuple[int, int]]:
    """Without a chat template: the tokens of each earlier assistant turn's text ("Assistant: <text>"), found
    through the tokenizer's character offsets (a slow tokenizer: by tokenizing the text up to each turn)."""
    text = fmt.render(tokenizer, messages)
    fast = getattr(tokenizer, "is_fast", False)
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"] if fast else []
    start = fmt.plain_template.format(prompt="\0").index("\0")
    spans = []
    for message in messages:
        start += len(f"{message['role'].capitalize()}: ")
        end = start + len(message["content"])
        if message["role"] == "assistant" and end > start:
            if fast:
                inside = [i for i, (a, b) in enumerate(offsets) if b > a and a >= start and b <= end]
                if inside:
                    spans.append((inside[0], inside[-1] + 1))
            else:
                before, through = tokenizer(text[:start]).input_ids, tokenizer(text[:end]).input_ids
                if through[: len(before)] == before and ids[: len(through)] == through:
                    spans.append((len(before), len(through)))
        start = end + 2  # the "\n\n" between turns
    return spans


def assistant_spans(tokenizer, fmt: PromptFormat, messages: list[dict], ids: list[int]) -> list[tuple[int, int]]:
    """Token spans of the earlier assistant turns inside a chat prompt's ids (they are trained on too).
    A template that does not render prefixes consistently gets no span (loss on the last turn only)."""
    if not fmt.chat:
        return plain_assistant_spans(tokenizer, fmt, messages, ids)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            continue
        before = message_tokens(tokenizer, fmt, messages[:i])
        through = message_tokens(tokenizer, fmt, messages[: i + 1], generation_prompt=False)
        if len(through) > len(before) and through[: len(before)] == before and ids[: len(through)] == through:
            spans.append((len(before), len(through)))
    return spans


def encode_example(example: Example, tokenizer, fmt: PromptFormat, max_length: int) -> dict | None:
    """input_ids = prompt + answer (the gold letter, or the target text) + eos; labels = -100 on the prompt
    (loss on the answer only; a chat example's earlier assistant turns are labelled too). None when the
    example cannot fit ``max_length`` without cutting into its question, options or target."""
    fmt = fmt.of(example)
    answer = tokenizer(fmt.answer_text(fmt.target(example)), add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None:
        answer = answer + [tokenizer.eos_token_id]
    if len(answer) >= max_length:
        return None
    prompt, truncated = encode_prompt(example, tokenizer, fmt, max_length, reserve=len(answer))
    if prompt is None:
        return None
    labels = [IGNORE_INDEX] * len(prompt)
    if example.messages is not None and sum(m["role"] == "assistant" for m in example.messages):
        kept = _kept_messages(example.messages, tokenizer, fmt, prompt)
        for start, end in assistant_spans(tokenizer, fmt, kept, prompt):
            labels[start:end] = prompt[start:end]
    return {
        "input_ids": prompt + answer,
        "labels": labels + answer,
        "prompt_length": len(prompt),
        "truncated": truncated,
    }


def _kept_messages(messages: list[dict], tokenizer, fmt: PromptFormat, prompt: list[int]) -> list[dict]:
    """The turns that survived truncation: the longest suffix (after a system turn) rendering to ``prompt``."""
    head = 1 if messages[0]["role"] == "system" else 0
    for start in range(head, len(messages)):
        kept = messages[:head] + messages[start:]
        if message_tokens(tokenizer, fmt, kept) == prompt:
            return kept
    return messages


def tokenize_examples(examples: list[Example], tokenizer, fmt: PromptFormat, max_length: int,
                      cache_dir: Path | None = None, desc: str = "tokenize", write_cache: bool = True) -> list[dict | None]:
    """Encode with an on-disk cache keyed by (examples, tokenizer, template, max_length). Aligned with
    ``examples``: None where an example cannot fit (see :func:`dropped_by_task`). ``write_cache=False``
    reads the cache but leaves a miss unwritten (the processes of a launch but the main one)."""
    from tqdm.auto import tqdm

    key = hashlib.sha256()
    key.update(json.dumps([e.to_dict() for e in examples], sort_keys=True).encode())
    key.update(fmt.fingerprint().encode())
    key.update(str(max_length).encode())
    key.update(tokenizer_fingerprint(tokenizer).encode())
    path = cache_dir / f"tokenized-{key.hexdigest()[:16]}.pt" if cache_dir else None
    if path is not None and path.is_file():
        return torch.load(path)
    encoded = [encode_example(e, tokenizer, fmt, max_length) for e in tqdm(examples, desc=desc, leave=False)]
    if path is not None and write_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(encoded, tmp)
        tmp.replace(path)
    return encoded


def dropped_by_task(examples: list[Example], encoded: list[dict | None]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for example, row in zip(examples, encoded):
        if row is None:
            counts[example.task] = counts.get(example.task, 0) + 1
    return counts


def check_dropped(examples: list[Example], encoded: list[dict | None], cfg: DataConfig) -> dict[str, int]:
    """Dropped training examples per task; one clear error when a task loses all of its examples or the
    mixture loses more than data.max_dropped_fraction."""
    dropped = dropped_by_task(examples, encoded)
    totals: dict[str, int] = {}
    for example in examples:
        totals[example.task] = totals.get(example.task, 0) + 1
    emptied = [t for t, n in dropped.items() if n == totals[t]]
    if emptied:
        raise RexftError(f"every training example of task {emptied[0]} ({totals[emptied[0]]}) is longer than "
                         f"data.max_length={cfg.max_length} tokens even without its passage; raise data.max_length")
    share = sum(dropped.values()) / max(1, len(examples))
    if share > cfg.max_dropped_fraction:
        worst = sorted(dropped, key=lambda t: -dropped[t])[:3]
        raise RexftError(f"{sum(dropped.values())} of {len(examples)} training examples ({share:.0%}, most in "
                         f"{', '.join(worst)}) do not fit data.max_length={cfg.max_length} tokens; raise data.max_length "
                         f"(or data.max_dropped_fraction={cfg.max_dropped_fraction})")
    if dropped:
        log.warning("dropped %d training examples that do not fit data.max_length=%d: %s", sum(dropped.values()),
                    cfg.max_length, ", ".join(f"{t} {n}" for t, n in sorted(dropped.items())))
    return dropped


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())[:5000]).encode()).hexdigest()[:12]
    return f"{type(tokenizer).__name__}:{len(vocab)}:{digest}:{getattr(tokenizer, 'chat_template', None) and hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()[:8]}"


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a batch, so every row's answer sits at the end (the loss needs logits only there).

    position_ids count real tokens, so a padded row computes what it would alone. Carries each row's
    prior (``rows[i]["prior"]``, shape (k,)) when present.
    """
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, width - n:] = torch.tensor(row["input_ids"])
        labels[i, width - n:] = torch.tensor(row["labels"])
        attention_mask[i, width - n:] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}
    if "prior" in rows[0]:
        batch["prior"] = torch.stack([torch.as_tensor(r["prior"], dtype=torch.float32) for r in rows])
    return batch


def pack_rows(rows: list[dict], max_length: int) -> list[dict]:
    """Sequence packing: several examples per row, first-fit over length-sorted examples (deterministic).

    position_ids restart at 0 for each example; with no attention mask, transformers builds a
    block-diagonal causal mask from those restarts (and flash-attention takes its varlen path), so
    attention stays within each example. That detection needs ``use_cache=False`` in the forward. Each token carries its own example's prior, (L, k).
    """
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(rows[i]["input_ids"])
        slot = next((b for b, free in enumerate(room) if free >= n), None)
        if slot is None:
            bins.append([i])
            room.append(max_length - n)
        else:
            bins[slot].append(i)
            room[slot] -= n
    packed = []
    for members in bins:
        row = {"input_ids": [], "labels": [], "position_ids": [], "packed": len(members)}
        for i in members:
            row["input_ids"] += rows[i]["input_ids"]
            row["labels"] += rows[i]["labels"]
            row["position_ids"] += list(range(len(rows[i]["input_ids"])))
        if "prior" in rows[members[0]]:
            row["prior"] = torch.cat([torch.as_tensor(rows[i]["prior"]).expand(len(rows[i]["input_ids"]), -1) for i in members])
        packed.append(row)
    return packed


def collate_packed(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed rows; the padding is one more 'sequence' (positions from 0) with no labels."""
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(width).repeat(len(rows), 1)
    token_mask = torch.zeros((len(rows), width), dtype=torch.long)
    example_ids = torch.full((len(rows), width), -1, dtype=torch.long)  # each token's example in the batch
    examples = 0
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        position_ids[i, :n] = torch.tensor(row["position_ids"])
        position_ids[i, n:] = torch.arange(width - n)
        token_mask[i, :n] = 1
        example_ids[i, :n] = examples + (position_ids[i, :n] == 0).cumsum(0) - 1  # a new example where positions restart
        examples += int((position_ids[i, :n] == 0).sum())
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "token_mask": token_mask,
             "example_ids": example_ids}  # token_mask and example_ids are for routing statistics (set_token_mask)
    if "prior" in rows[0]:
        k = rows[0]["prior"].shape[-1]
        prior = torch.zeros(len(rows), width, k)
        for i, row in enumerate(rows):
            prior[i, : len(row["input_ids"])] = row["prior"]
        batch["prior"] = prior  # (b, L, k): per token
    return batch


def length_grouped_order(lengths: list[int], batch_size: int, seed: int) -> list[int]:
    """A seeded shuffle in which each run of ``batch_size * 16`` is sorted by length, then batches are
    shuffled: batches of similar length (little padding) in random order."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 16
    grouped = []
    for start in range(0, len(order), chunk):
        grouped += sorted(order[start:start + chunk], key=lambda i: -lengths[i])
    batches = [grouped[i:i + batch_size] for i in range(0, len(grouped), batch_size)]
    rng.shuffle(batches)
    return [i for b in batches for i in b]


# ---------------------------------------------------------------------------------------------- stage
def percentile(values: list[int], q: float) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def prepare_data(cfg: RunConfig) -> Path:
    """``rexft data``: write data/{train,validation,tuning}.jsonl, the split record data/split.json (rexft/splits.py),
    data/stats.json and print the table."""
    from rexft.modeling import load_tokenizer
    from rexft.rundir import atomic_write_text, write_json, write_jsonl
    from rexft.splits import prepared_splits, record_path, split_record

    splits, unseen = prepared_splits(cfg)
    train = mixture(splits, cfg.data)
    tokenizer = load_tokenizer(cfg.model)
    fmt = PromptFormat.for_model(tokenizer, cfg.model)
    encoded_train = tokenize_examples(train, tokenizer, fmt, cfg.data.max_length, desc="tokenize train")
    check_dropped(train, encoded_train, cfg.data)
    evaluation = [e for split in splits + unseen for e in split.eval]
    encoded_eval = tokenize_examples(evaluation, tokenizer, fmt, cfg.data.max_length, desc="tokenize eval")
    stats = {"train_examples": sum(r is not None for r in encoded_train), "max_length": cfg.data.max_length,
             "template": "chat" if fmt.chat else "plain", "prompt_style": cfg.data.prompt_style,
             "tasks": task_stats(splits, unseen, train + evaluation, encoded_train + encoded_eval)}
    tuning = [e for split in splits for e in split.tuning]
    encoded_tuning = tokenize_examples(tuning, tokenizer, fmt, cfg.data.max_length, desc="tokenize tuning") if tuning else []
    kept = [e for e, r in zip(train, encoded_train) if r is not None]
    record = split_record(cfg, splits, unseen, kept, [e for e, r in zip(evaluation, encoded_eval) if r is None],
                          [e for e, r in zip(tuning, encoded_tuning) if r is None])
    empty = [s.task for s in splits + unseen if not s.eval]
    if empty:
        log.warning("no held-out rows for %s: eval reports these tasks as not scored", ", ".join(empty))
    # Everything is computed before anything is written, so a bad record leaves no half-written data/.
    out = cfg.path / "data"
    write_jsonl(out / "train.jsonl", [e.to_dict() for e in kept])
    write_jsonl(out / "validation.jsonl", [e.to_dict() for e in evaluation])
    write_jsonl(out / "tuning.jsonl", [e.to_dict() for e in tuning])
    write_json(record_path(cfg.path), record)
    write_json(out / "stats.json", stats)
    table = f"prompt style: {cfg.data.prompt_style}\n\n{stats_table(stats)}"
    atomic_write_text(out / "stats.md", table + "\n")
    print(table)
    return out


def task_stats(splits: list[TaskSplit], unseen: list[TaskSplit], examples: list[Example],
               encoded: list[dict | None]) -> dict[str, dict]:
    """Per task: counts, token lengths, truncated and dropped examples (training and evaluation together)."""
    by_task: dict[str, list[tuple[Example, dict | None]]] = {}
    for example, row in zip(examples, encoded):
        by_task.setdefault(example.task, []).append((example, row))
    stats, unseen_tasks = {}, {s.task for s in unseen}
    for split in splits + unseen:
        pairs = by_task.get(split.task, [])
        rows = [r for _, r in pairs]
        lengths = [len(r["input_ids"]) for r in rows if r is not None]
        trained = len(pairs) - len(split.eval)  # a task's training examples come first in ``examples``
        stats[split.task] = {
            "source": split.source, "kind": split.kind, "unseen": split.task in unseen_tasks,
            "train": sum(r is not None for r in rows[:trained]), "eval": len(split.eval), "tuning": len(split.tuning),
            "train_source": split.train_source, "answers": split.answers,
            "tokens_p50": percentile(lengths, 50), "tokens_p90": percentile(lengths, 90),
            "tokens_p99": percentile(lengths, 99), "tokens_max": max(lengths, default=0),
            "truncated": sum(r["truncated"] for r in rows if r is not None),
            "dropped": sum(r is None for r in rows),
        }
    return stats


def stats_table(stats: dict) -> str:
    """One row per task (every task: the file is the record), and totals per kind of task."""
    header = "| task | kind | answers read as | train | eval | train from | p50 | p90 | p99 | max | truncated | dropped |"
    lines = [header, "|" + "---|" * 12]
    for task, s in stats["tasks"].items():
        lines.append(f"| {task} | {s['kind']} | {s.get('answers') or '-'} | {s['train']} | {s['eval']} | "
                     f"{s['train_source'].split(' (')[0]}{' (unseen)' if s.get('unseen') else ''} | "
                     f"{s['tokens_p50']} | {s['tokens_p90']} | {s['tokens_p99']} | {s['tokens_max']} | {s['truncated']} | "
                     f"{s['dropped']} |")
    for kind in sorted({s["kind"] for s in stats["tasks"].values()}):
        rows = [s for s in stats["tasks"].values() if s["kind"] == kind]
        lines.append(f"| **{len(rows)} {kind} task{'s' * (len(rows) != 1)}** | {kind} | | {sum(s['train'] for s in rows)} | "
                     f"{sum(s['eval'] for s in rows)} | | | | | {max(s['tokens_max'] for s in rows)} | {sum(s['truncated'] for s in rows)} | "
                     f"{sum(s['dropped'] for s in rows)} |")
    return "\n".join(lines)
