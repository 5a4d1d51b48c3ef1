"""Splits: each task's records read (built-ins and sources), split into train and held-out rows, mixed; and the
run's frozen split, what ``rexft data`` trained on and held out, read by every later stage.

``rexft data`` writes, beside data/train.jsonl (the training mixture, the examples that fit data.max_length) and
data/validation.jsonl (every evaluation example: held-in tasks' held-out rows, unseen tasks' rows),

    data/split.json   the data settings it ran with; per task its source, kind, where its evaluation rows
                      come from, the rows (0-based record ids) trained on, held out and not scored (too long
                      for data.max_length); and the sha256 of every local file read

cluster-prior, train, eval and merge-export read these files, never the sources again: a source edited since
is named in a warning and the recorded rows are used, so a row trained on is never scored as held out.
A run directory made before this record fails with one line saying what to re-run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from rexft.config import DataConfig, RunConfig
from rexft.errors import RexftError
from rexft.tasks import get_task
from rexft.tasks.common import LETTERS, Checker, Example

log = logging.getLogger(__name__)
VERSION = 1
TRAINING_ONLY = ("packing", "max_dropped_fraction")  # data keys that change no row of the split


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
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise RexftError(f"{task}: {path} is not UTF-8 text (byte offset {err.start}); restore the file") from None
        # One record per line (not splitlines(): U+2028 may sit inside a string), so line N is record N.
        for number, line in enumerate(text.removesuffix("\n").split("\n"), 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RexftError(f"{task}: {path} line {number} column {err.colno}: not valid JSON ({err.msg})") from None
        return records, str(path)
    import datasets  # the hub path, for online users

    hub_path, hub_name = module.HUB
    hub_split = module.HUB_SPLITS[split]
    try:
        dataset = datasets.load_dataset(hub_path, hub_name, split=hub_split)
    except ValueError:  # unknown split
        return None
    return [dict(r) for r in dataset], f"hub {hub_path}/{hub_name or ''}[{hub_split}]"


def load_examples(task: str, split: str, local_dir: str | None, prompt_style: str = "chat") -> list[Example] | None:
    """A built-in task's examples in a prompt style: chat (``to_example``) or harness (``to_harness``,
    lm-eval's zero-shot format; see rexft/tasks/common.py)."""
    loaded = read_records(task, split, local_dir)
    if loaded is None:
        return None
    records, source = loaded
    module = get_task(task)
    layout = module.to_harness if prompt_style == "harness" else module.to_example
    examples = []
    unit = "record" if source.startswith("hub ") else "line"  # a local file holds one record per line
    for row, record in enumerate(records):
        check = Checker(task, source, row, f"{unit} {row + 1}")
        if not isinstance(record, dict):
            check.fail("record is not a JSON object")
        check.fields(record, module.FIELDS)
        prompt, options, gold, context_chars = layout(record, check)
        examples.append(Example(task, row, prompt, options, LETTERS[gold], context_chars, prompt_style=prompt_style))
    return examples


# ------------------------------------------------------------------------------------------- splitting
@dataclass
class TaskSplit:
    task: str
    train: list[Example]
    eval: list[Example]
    train_source: str  # "train" | "validation (first part of a seeded shuffle)" | "train (held-out part ...)" | "none"
    source: str = ""  # the data.tasks entry it came from: a built-in task or a data.sources name
    kind: str = "choice"  # choice | generate (what its examples are)
    answers: str = ""  # a choice source: how its answers were read (index, letter, text; "letter=text": both agreed)

    @property
    def eval_from(self) -> str:
        """Where the evaluation rows come from, in words."""
        if self.train_source in ("train", "none"):
            return "validation"
        return ("validation rows held out from training" if self.train_source.startswith("validation")
                else "train rows held out from training")


def _seeded_order(n: int, seed: int, task: str) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + zlib.crc32(task.encode())).shuffle(order)
    return order


def split_task(task: str, cfg: DataConfig) -> TaskSplit:
    validation = load_examples(task, "validation", cfg.local_dir, cfg.prompt_style)
    if validation is None:
        raise RexftError(f"{task}: no validation split (data.local_dir={cfg.local_dir})")
    train = load_examples(task, "train", cfg.local_dir, cfg.prompt_style)
    if train is not None:
        return TaskSplit(task, train, validation, "train", task)
    if cfg.no_train_split == "skip":
        return TaskSplit(task, [], validation, "none", task)
    order = _seeded_order(len(validation), cfg.seed, task)
    cut = int(len(order) * cfg.validation_train_fraction)
    train_rows, eval_rows = sorted(order[:cut]), sorted(order[cut:])
    return TaskSplit(task, [validation[i] for i in train_rows], [validation[i] for i in eval_rows],
                     f"validation rows (seeded {cfg.validation_train_fraction:.0%} part; eval on the rest)", task)


def source_splits(name: str, cfg: DataConfig) -> list[TaskSplit]:
    """The tasks of one user source; where it has no validation split, a seeded share of train is held out."""
    from rexft.sources import load_source

    spec = cfg.sources[name]
    splits = []
    for found in load_source(name, spec, cfg):
        train, evaluation, origin = found.train or [], found.eval, "train" if found.train is not None else "none"
        if evaluation is None:
            order = _seeded_order(len(train), cfg.seed, found.task)
            cut = len(order) - max(1, round(len(order) * spec.holdout)) if len(order) > 1 else len(order)
            evaluation = [train[i] for i in sorted(order[cut:])]
            train = [train[i] for i in sorted(order[:cut])]
            origin = f"train rows (seeded {1 - spec.holdout:.0%} part; eval on the held-out rest)"
        examples = train or evaluation
        kind = examples[0].kind if examples else ("choice" if spec.format == "choice" else "generate")
        splits.append(TaskSplit(found.task, train, evaluation, origin, name, kind, ", ".join(found.readings)))
    return splits


def cap_examples(examples: list[Example], cap: int | None, seed: int, task: str) -> list[Example]:
    if cap is None or len(examples) <= cap:
        return examples
    keep = sorted(_seeded_order(len(examples), seed, task)[:cap])
    return [examples[i] for i in keep]


def as_unseen(split: TaskSplit) -> TaskSplit:
    """A task never trained on is evaluated on all its rows, unless it has a validation split of its own."""
    if split.eval_from != "validation":
        split.eval = sorted(split.train + split.eval, key=lambda e: e.row)  # one file's rows: distinct
        split.train_source = "none (unseen: evaluated on all its rows)"
    split.train = []
    return split


def build_splits(cfg: DataConfig, entries: list[str] | None = None, unseen: bool = False) -> list[TaskSplit]:
    """Per task: capped train and eval examples, for the data.tasks entries (built-ins and sources; a source
    with a task column expands into many tasks), or for ``entries`` evaluated unseen (:func:`as_unseen`).
    Deterministic from data.seed."""
    splits, origin = [], {}
    for entry in entries if entries is not None else cfg.tasks:
        if entry in cfg.sources:
            spec = cfg.sources[entry]
            found = source_splits(entry, cfg)
            caps = (spec.train_per_task if spec.train_per_task is not None else cfg.train_per_task,
                    spec.eval_per_task if spec.eval_per_task is not None else cfg.eval_per_task)
        else:
            split = split_task(entry, cfg)
            split.kind = "choice"
            found, caps = [split], (cfg.train_per_task, cfg.eval_per_task)
        for split in found:
            if split.task in origin:
                raise RexftError(f"two tasks are named '{split.task}' (from {origin[split.task]} and {entry}); "
                                 "rename one (a source's task column values are task names)")
            origin[split.task] = entry
            split = as_unseen(split) if unseen else split
            split.train = cap_examples(split.train, caps[0], cfg.seed, split.task)
            split.eval = cap_examples(split.eval, caps[1], cfg.seed + 1, split.task)
            splits.append(split)
    return splits


def select_splits(splits: list[TaskSplit], names: list[str] | None) -> list[TaskSplit]:
    """The splits named by task or by source (a source selects all of its tasks); None selects all."""
    if names is None:
        return splits
    known = {s.task for s in splits} | {s.source for s in splits}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise RexftError(f"eval.tasks names {unknown[:5]}, which are neither tasks nor sources of data.tasks")
    return [s for s in splits if s.task in names or s.source in names]


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


# ---------------------------------------------------------------------------------------- the record

def record_path(run_dir: Path) -> Path:
    return Path(run_dir) / "data" / "split.json"


def data_settings(cfg: RunConfig) -> dict:
    """What the split depends on: the data config (less training-only keys) and the unseen tasks."""
    data = {k: v for k, v in asdict(cfg.data).items() if k not in TRAINING_ONLY}
    return json.loads(json.dumps({"data": data, "unseen_tasks": list(cfg.eval.unseen_tasks)}, default=str))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_files(data: DataConfig, entries: list[str]) -> dict[str, dict]:
    """Every local file the entries read: path -> {source, sha256} (hub datasets are not fingerprinted)."""
    from rexft.sources import source_files

    files = {}
    for entry in entries:
        if entry in data.sources:
            paths = source_files(entry, data.sources[entry], data)
        elif data.local_dir is not None:
            paths = [p for p in (Path(data.local_dir) / entry / f"{s}.jsonl" for s in ("train", "validation")) if p.is_file()]
        else:
            paths = []
        files.update({str(p.resolve()): {"source": entry, "sha256": sha256(p)} for p in paths})
    return files


def split_record(cfg: RunConfig, splits: list[TaskSplit], unseen: list[TaskSplit], train: list[Example],
                 not_scored: list[Example]) -> dict:
    """The record ``rexft data`` writes: ``train`` is the kept mixture, ``not_scored`` the eval examples dropped."""
    trained: dict[str, set[int]] = {}
    for example in train:
        trained.setdefault(example.task, set()).add(example.row)
    dropped: dict[str, set[int]] = {}
    for example in not_scored:
        dropped.setdefault(example.task, set()).add(example.row)
    tasks, unseen_tasks = {}, {s.task for s in unseen}
    for split in splits + unseen:
        tasks[split.task] = {"source": split.source, "kind": split.kind, "unseen": split.task in unseen_tasks,
                             "train_source": split.train_source, "eval_from": split.eval_from,
                             "train_rows": sorted(trained.get(split.task, ())),
                             "eval_rows": [e.row for e in split.eval],
                             "not_scored": sorted(dropped.get(split.task, ()))}
    return {"version": VERSION, **data_settings(cfg), "files": input_files(cfg.data, cfg.data.tasks + cfg.eval.unseen_tasks),
            "tasks": tasks}


def check_unseen(splits: list[TaskSplit], unseen: list[TaskSplit]) -> None:
    trained = {s.task: s.source for s in splits}
    clash = next((s for s in unseen if s.task in trained), None)
    if clash is not None:
        raise RexftError(f"eval.unseen_tasks: task '{clash.task}' (from {clash.source}) is also trained on "
                         f"(data.tasks entry {trained[clash.task]}); an unseen task must never be trained on")


# ------------------------------------------------------------------------------------------------ reading
def read_record(cfg: RunConfig) -> dict:
    """The run's split record; one line naming what to re-run when it is missing or made with other settings."""
    path = record_path(cfg.path)
    if not path.is_file():
        why = ("made before rexft recorded its split" if (cfg.path / "data" / "train.jsonl").is_file()
               else "has no prepared data")
        raise RexftError(f"run directory {cfg.path} {why}: run `rexft data` with this run's recipe and overrides first "
                         "(the same files and settings give the same split)")
    record = json.loads(path.read_text())
    differ = differing_settings(record, cfg)
    if differ:
        raise RexftError(f"{differ[0]} differs from the run's data (prepared by `rexft data` with {differ[1]}); "
                         "run `rexft data` with these settings first, or drop the override")
    warn_changed_files(record)
    return record


def differing_settings(record: dict, cfg: RunConfig) -> tuple[str, str] | None:
    """(key = value now, key = value recorded) of the first data setting that differs, else None."""
    now, then = data_settings(cfg), {"data": record.get("data", {}), "unseen_tasks": record.get("unseen_tasks", [])}
    pairs = [(f"data.{k}", v, then["data"].get(k)) for k, v in now["data"].items()]
    pairs.append(("eval.unseen_tasks", now["unseen_tasks"], then["unseen_tasks"]))
    for key, value, recorded in pairs:
        if value != recorded:
            return f"{key}={json.dumps(value)}", f"{key}={json.dumps(recorded)}"
    return None


def is_stale(cfg: RunConfig) -> bool:
    """No record, or one made with other data settings: train and cluster-prior run `rexft data` first."""
    path = record_path(cfg.path)
    return not path.is_file() or differing_settings(json.loads(path.read_text()), cfg) is not None


def warn_changed_files(record: dict) -> None:
    for path, seen in record["files"].items():
        now = sha256(Path(path)) if Path(path).is_file() else None
        if now != seen["sha256"]:
            state = "was removed" if now is None else "changed"
            log.warning("%s (%s) %s since `rexft data`: this run keeps the rows recorded then; run `rexft data` "
                        "to use the file as it is now", path, seen["source"], state)


def _examples(path: Path) -> list[Example]:
    from rexft.rundir import read_jsonl

    return [Example(**row) for row in read_jsonl(path)]


def frozen_mixture(cfg: RunConfig) -> list[Example]:
    """The training mixture ``rexft data`` wrote, in its order (the rows cluster-prior embeds and train uses)."""
    read_record(cfg)
    return _examples(cfg.path / "data" / "train.jsonl")


def _not_scored(example: Example, record: dict) -> bool:
    return example.row in record["tasks"][example.task]["not_scored"]


def frozen_splits(cfg: RunConfig, record: dict | None = None, unseen: bool = False) -> list[TaskSplit]:
    """The held-in (or unseen) tasks of the record with their trained examples (by row) and the evaluation
    examples to score (those `rexft data` found too long are left out: see :func:`eval_set`)."""
    record = record or read_record(cfg)
    train: dict[str, dict[int, Example]] = {}
    for example in _examples(cfg.path / "data" / "train.jsonl"):
        train.setdefault(example.task, {})[example.row] = example
    evaluation: dict[str, list[Example]] = {}
    for example in _examples(cfg.path / "data" / "validation.jsonl"):
        if not _not_scored(example, record):
            evaluation.setdefault(example.task, []).append(example)
    return [TaskSplit(task, [e for _, e in sorted(train.get(task, {}).items())], evaluation.get(task, []),
                      entry["train_source"], entry["source"], entry["kind"])
            for task, entry in record["tasks"].items() if entry["unseen"] == unseen]


@dataclass
class EvalSet:
    """What eval scores, from the frozen split."""

    examples: list[Example]  # to score
    not_scored: list[Example]  # held out, but dropped by `rexft data` (too long): counted, never scored
    tasks: list[str]  # every task evaluated, also those with no held-out rows (reported, not hidden)
    sources: dict[str, str]  # task -> where its evaluation rows come from
    unseen: set[str]


def eval_set(cfg: RunConfig) -> EvalSet:
    """Held-in tasks (eval.tasks, or all of data.tasks) and unseen tasks (eval.unseen_tasks): the recorded
    held-out rows, less those `rexft data` found too long (counted, not scored), capped at eval.limit."""
    record = read_record(cfg)
    held = select_splits(frozen_splits(cfg, record), cfg.eval.tasks)
    unseen = frozen_splits(cfg, record, unseen=True)
    out = EvalSet([], [], [s.task for s in held + unseen], {}, {s.task for s in unseen})
    for split in held + unseen:
        out.examples += cap_examples(split.eval, cfg.eval.limit, cfg.data.seed + 2, split.task)
        out.sources[split.task] = record["tasks"][split.task]["eval_from"]
    out.not_scored = [e for e in _examples(cfg.path / "data" / "validation.jsonl")
                      if e.task in out.tasks and _not_scored(e, record)]
    empty = [t for t in out.tasks if not record["tasks"][t]["eval_rows"]]
    if empty:
        log.warning("no held-out rows to score for %s (its validation split has none of its rows)", ", ".join(empty))
    return out


def prepared_splits(cfg: RunConfig) -> tuple[list[TaskSplit], list[TaskSplit]]:
    """(held-in, unseen) splits for `rexft data`, read from the sources."""
    splits = build_splits(cfg.data)
    unseen = build_splits(cfg.data, cfg.eval.unseen_tasks, unseen=True) if cfg.eval.unseen_tasks else []
    check_unseen(splits, unseen)
    return splits, unseen


def examples_digest(examples: list[Example]) -> dict[str, str]:
    """task -> a short digest of the examples scored: two runs with the same digest scored the same examples."""
    rows: dict[str, list] = {}
    for example in examples:
        rows.setdefault(example.task, []).append([example.row, example.prompt, example.answer])
    return {task: hashlib.sha256(json.dumps(sorted(r)).encode()).hexdigest()[:12] for task, r in rows.items()}
