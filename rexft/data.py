"""Data stage: raw records -> multiple-choice examples -> training mixture and eval sets -> token ids.

    records (hub or <local_dir>/<task>/<split>.jsonl)
      -> Example(task, row, prompt, options, answer)          one loader per task (rexft/tasks/)
      -> train / eval split per task (tasks without a train split: disjoint halves of validation)
      -> mixture (caps, proportional or temperature sampling; seeded)
      -> token ids with the chat template (or plain template), loss on the answer tokens only

``rexft data`` writes run_dir/data/{train,validation}.jsonl and stats.json and prints a table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rexft.config import DataConfig, ModelConfig, RunConfig
from rexft.errors import RexftError
from rexft.tasks import get_task
from rexft.tasks.common import LETTERS, Checker, Example

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------- loading
def read_records(task: str, split: str, local_dir: str | None) -> tuple[list[dict], str] | None:
    """Raw records of one split and a name for error messages; None if the split does not exist."""
    module = get_task(task)
    if local_dir is not None:
        folder = Path(local_dir) / task
        if not folder.is_dir():
            raise RexftError(f"{task}: no folder {folder} (data.local_dir={local_dir})")
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            return None
        records = []
        with open(path) as handle:
            for row, line in enumerate(handle):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise RexftError(f"{task}: {path} row {row}: not valid JSON ({err.msg})") from None
        return records, str(path)
    import datasets  # the hub path, for online users

    hub_path, hub_name = module.HUB
    hub_split = module.HUB_SPLITS[split]
    try:
        dataset = datasets.load_dataset(hub_path, hub_name, split=hub_split)
    except ValueError:  # unknown split
        return None
    return [dict(r) for r in dataset], f"hub {hub_path}/{hub_name or ''}[{hub_split}]"


def load_examples(task: str, split: str, local_dir: str | None) -> list[Example] | None:
    loaded = read_records(task, split, local_dir)
    if loaded is None:
        return None
    records, source = loaded
    module = get_task(task)
    examples = []
    for row, record in enumerate(records):
        check = Checker(task, source, row)
        if not isinstance(record, dict):
            check.fail("record is not a JSON object")
        check.fields(record, module.FIELDS)
        prompt, options, gold, context_chars = module.to_example(record, check)
        examples.append(Example(task, row, prompt, options, LETTERS[gold], context_chars))
    return examples


# ------------------------------------------------------------------------------------------- splitting
@dataclass
class TaskSplit:
    task: str
    train: list[Example]
    eval: list[Example]
    train_source: str  # "train" | "validation (first part of a seeded shuffle)" | "none"


def _seeded_order(n: int, seed: int, task: str) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + zlib.crc32(task.encode())).shuffle(order)
    return order


def split_task(task: str, cfg: DataConfig) -> TaskSplit:
    validation = load_examples(task, "validation", cfg.local_dir)
    if validation is None:
        raise RexftError(f"{task}: no validation split (data.local_dir={cfg.local_dir})")
    train = load_examples(task, "train", cfg.local_dir)
    if train is not None:
        return TaskSplit(task, train, validation, "train")
    if cfg.no_train_split == "skip":
        return TaskSplit(task, [], validation, "none")
    order = _seeded_order(len(validation), cfg.seed, task)
    cut = int(len(order) * cfg.validation_train_fraction)
    train_rows, eval_rows = sorted(order[:cut]), sorted(order[cut:])
    return TaskSplit(task, [validation[i] for i in train_rows], [validation[i] for i in eval_rows],
                     f"validation rows (seeded {cfg.validation_train_fraction:.0%} part; eval on the rest)")


def cap_examples(examples: list[Example], cap: int | None, seed: int, task: str) -> list[Example]:
    if cap is None or len(examples) <= cap:
        return examples
    keep = sorted(_seeded_order(len(examples), seed, task)[:cap])
    return [examples[i] for i in keep]


def build_splits(cfg: DataConfig, tasks: list[str] | None = None) -> list[TaskSplit]:
    """Per task: capped train and eval examples. Deterministic from data.seed."""
    splits = []
    for task in tasks or cfg.tasks:
        split = split_task(task, cfg)
        split.train = cap_examples(split.train, cfg.train_per_task, cfg.seed, task)
        split.eval = cap_examples(split.eval, cfg.eval_per_task, cfg.seed + 1, task)
        splits.append(split)
    return splits


def mixture(splits: list[TaskSplit], cfg: DataConfig) -> list[Example]:
    """The training mixture, shuffled with data.seed.

    proportional: every (capped) example once. temperature: draw ``mixture_size`` examples with task
    probability p_t ~ n_t ** (1 / T) (T = 1 is proportional, large T approaches uniform), cycling through
    each task's seeded order so repeats only happen once a task is exhausted.
    """
    rng = random.Random(cfg.seed)
    if cfg.mixture == "proportional":
        mixed = [example for split in splits for example in split.train]
    else:
        pools = [s.train for s in splits if s.train]
        weights = [len(p) ** (1.0 / cfg.temperature) for p in pools]
        size = cfg.mixture_size or sum(len(p) for p in pools)
        counts = [0] * len(pools)
        for index in rng.choices(range(len(pools)), weights=weights, k=size):
            counts[index] += 1
        mixed = []
        for pool, count in zip(pools, counts):
            order = _seeded_order(len(pool), cfg.seed, pool[0].task)
            mixed += [pool[order[i % len(pool)]] for i in range(count)]
    rng.shuffle(mixed)
    return mixed


# ------------------------------------------------------------------------------------------ tokenizing
@dataclass
class PromptFormat:
    """How a prompt becomes text: the tokenizer's chat template, else ``plain_template``."""

    chat: bool
    plain_template: str

    @classmethod
    def for_model(cls, tokenizer, cfg: ModelConfig) -> "PromptFormat":
        return cls(bool(cfg.use_chat_template and getattr(tokenizer, "chat_template", None)), cfg.plain_template)

    def render(self, tokenizer, prompt: str) -> str:
        if self.chat:
            return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 add_generation_prompt=True, tokenize=False)
        return self.plain_template.format(prompt=prompt)

    def answer_text(self, letter: str) -> str:
        return letter if self.chat else f" {letter}"

    def fingerprint(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


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


def encode_prompt(example: Example, tokenizer, fmt: PromptFormat, max_length: int, reserve: int = 0) -> tuple[list[int], bool]:
    """Prompt token ids, at most ``max_length - reserve`` long. The passage is trimmed first; if that is
    not enough, tokens are dropped from the start of the prompt, never from the options at its end."""
    budget = max_length - reserve
    prompt = example.prompt
    add_special = not fmt.chat  # chat templates carry their own special tokens
    ids = tokenizer(fmt.render(tokenizer, prompt), add_special_tokens=add_special).input_ids
    truncated = len(ids) > budget
    for _ in range(3):
        if len(ids) <= budget or example.context_chars == 0:
            break
        context, rest = prompt[: example.context_chars], prompt[example.context_chars:]
        context_ids = tokenizer(context, add_special_tokens=False).input_ids
        keep = max(0, len(context_ids) - (len(ids) - budget) - 4)
        prompt = (tokenizer.decode(context_ids[:keep]).rstrip() + " ...\n" if keep else "") + rest
        example = Example(example.task, example.row, prompt, example.options, example.answer, 0 if not keep else len(prompt) - len(rest))
        ids = tokenizer(fmt.render(tokenizer, prompt), add_special_tokens=add_special).input_ids
    if len(ids) > budget:
        head = 1 if add_special and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id else 0
        ids = ids[:head] + ids[len(ids) - budget + head:]
    return ids, truncated


def encode_example(example: Example, tokenizer, fmt: PromptFormat, max_length: int) -> dict:
    """input_ids = prompt + answer letter + eos; labels = -100 on the prompt (loss on the answer only)."""
    answer = tokenizer(fmt.answer_text(example.answer), add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None:
        answer = answer + [tokenizer.eos_token_id]
    prompt, truncated = encode_prompt(example, tokenizer, fmt, max_length, reserve=len(answer))
    return {
        "input_ids": prompt + answer,
        "labels": [IGNORE_INDEX] * len(prompt) + answer,
        "prompt_length": len(prompt),
        "truncated": truncated,
    }


def tokenize_examples(examples: list[Example], tokenizer, fmt: PromptFormat, max_length: int,
                      cache_dir: Path | None = None, desc: str = "tokenize") -> list[dict]:
    """Encode with an on-disk cache keyed by (examples, tokenizer, template, max_length)."""
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
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # processes of one launch may race here
        torch.save(encoded, tmp)
        tmp.replace(path)
    return encoded


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
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        position_ids[i, :n] = torch.tensor(row["position_ids"])
        position_ids[i, n:] = torch.arange(width - n)
        token_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "token_mask": token_mask}
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
    """``rexft data``: write data/{train,validation}.jsonl, data/stats.json and print the table."""
    from rexft.modeling import load_tokenizer
    from rexft.rundir import write_json, write_jsonl

    splits = build_splits(cfg.data)
    train = mixture(splits, cfg.data)
    tokenizer = load_tokenizer(cfg.model)
    fmt = PromptFormat.for_model(tokenizer, cfg.model)
    out = cfg.path / "data"
    stats = {"train_examples": len(train), "max_length": cfg.data.max_length, "template": "chat" if fmt.chat else "plain", "tasks": {}}
    for split in splits:
        task_train = [e for e in train if e.task == split.task]
        encoded = [encode_example(e, tokenizer, fmt, cfg.data.max_length) for e in task_train + split.eval]
        lengths = [len(r["input_ids"]) for r in encoded]
        stats["tasks"][split.task] = {
            "train": len(task_train), "eval": len(split.eval), "train_source": split.train_source,
            "tokens_p50": percentile(lengths, 50), "tokens_p90": percentile(lengths, 90),
            "tokens_p99": percentile(lengths, 99), "tokens_max": max(lengths, default=0),
            "truncated": sum(r["truncated"] for r in encoded),
        }
    # Everything is computed before anything is written, so a bad record leaves no half-written data/.
    write_jsonl(out / "train.jsonl", [e.to_dict() for e in train])
    write_jsonl(out / "validation.jsonl", [e.to_dict() for s in splits for e in s.eval])
    write_json(out / "stats.json", stats)
    print(stats_table(stats))
    return out


def stats_table(stats: dict) -> str:
    header = "| task | train | eval | train from | p50 | p90 | p99 | max | truncated |"
    lines = [header, "|" + "---|" * 9]
    for task, s in stats["tasks"].items():
        lines.append(f"| {task} | {s['train']} | {s['eval']} | {s['train_source'].split(' (')[0]} | {s['tokens_p50']} | "
                     f"{s['tokens_p90']} | {s['tokens_p99']} | {s['tokens_max']} | {s['truncated']} |")
    return "\n".join(lines)
