"""Splits: each task's records read (built-ins and sources, one path: rexft/sources.py), split into train and
held-out rows (one fallback policy for a missing split: :func:`fallback_split`), mixed; and the run's frozen split, what ``rexft data`` trained on and held out, read by every later stage.

``rexft data`` writes, beside data/train.jsonl (the training mixture, the examples that fit data.max_length) and
data/validation.jsonl (every evaluation example: held-in tasks' held-out rows, unseen tasks' rows), data/tuning.jsonl
(the tuning split, data.tuning_per_task training rows per task that are never trained on: sweeps choose on it),

    data/split.json   the data settings it ran with; per task its source, kind, where its evaluation rows
                      come from, the rows (0-based record ids) trained on, held out, set aside for tuning and
                      not scored (too long for data.max_length); and the sha256 of every local file read

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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rexft.config import DataConfig, RunConfig, TaskSpec
from rexft.errors import RexftError
from rexft.sources import SourceTask, load_source, load_tasks, source_files
from rexft.tasks import get_task
from rexft.tasks.common import LETTERS, Example, converter, source_spec

log = logging.getLogger(__name__)
VERSION = 1
TRAINING_ONLY = ("packing", "max_dropped_fraction")  # data keys that change no row of the split


# ---------------------------------------------------------------------------------------------- loading
def load_builtin(task: str, data: DataConfig) -> SourceTask:
    """A built-in task's train and validation examples (None where a split is absent), in data.prompt_style: its
    module's spec read through the source path like a user's local JSONL source, each record converted by its module."""
    module = get_task(task)
    (found,) = load_tasks(task, task, source_spec(task, module, data), data, converter(module, data.prompt_style))
    return found


# ------------------------------------------------------------------------------------------- splitting
@dataclass
class TaskSplit:
    task: str
    train: list[Example]
    eval: list[Example]
    train_source: str  # where the train rows come from, in words (:func:`fallback_split`; "none": not trained on)
    source: str = ""  # the data.tasks entry it came from: a built-in task or a data.sources name
    answers: str = ""  # a choice source: how its answers were read (index, letter, text; "letter=text": both agreed)
    tuning: list[Example] = field(default_factory=list)  # training rows set aside for sweeps (data.tuning_per_task)

    @property
    def kind(self) -> str:
        """What its examples are (choice | generate), as they say; "empty" for a task with no rows."""
        return next((e.kind for e in self.train + self.eval), "empty")

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


def fallback_split(found: SourceTask, spec: TaskSpec, cfg: DataConfig) -> tuple[list[Example], list[Example], str]:
    """(train, eval, train_source) of one task: the one policy for a task missing a split, built-in or source.

    both splits: train on train, evaluate on validation ("train");
    no validation split: hold out a seeded share ``holdout`` of train (the spec's; at least one row) for
        evaluation: "train rows (seeded 90% part; eval on the held-out rest)";
    no train split: data.no_train_split=split_validation trains on a seeded share data.validation_train_fraction
        of validation and evaluates on the rest: "validation rows (seeded 50% part; eval on the rest)";
        data.no_train_split=skip, or a source whose train_split is null, evaluates on all of validation ("none").
    The shares are seeded by data.seed and the task name, so the same files give the same rows.
    """
    if found.train is not None and found.eval is not None:
        return found.train, found.eval, "train"
    if found.eval is None:
        order = _seeded_order(len(found.train), cfg.seed, found.task)
        cut = len(order) - max(1, round(len(order) * spec.holdout)) if len(order) > 1 else len(order)
        return ([found.train[i] for i in sorted(order[:cut])], [found.train[i] for i in sorted(order[cut:])],
                f"train rows (seeded {1 - spec.holdout:.0%} part; eval on the held-out rest)")
    if cfg.no_train_split == "skip" or spec.train_split is None:
        return [], found.eval, "none"
    order = _seeded_order(len(found.eval), cfg.seed, found.task)
    cut = int(len(order) * cfg.validation_train_fraction)
    return ([found.eval[i] for i in sorted(order[:cut])], [found.eval[i] for i in sorted(order[cut:])],
            f"validation rows (seeded {cfg.validation_train_fraction:.0%} part; eval on the rest)")


def entry_splits(entry: str, cfg: DataConfig) -> list[TaskSplit]:
    """The tasks of one data.tasks entry, a built-in task or a user source, split by :func:`fallback_split`."""
    if entry in cfg.sources:
        spec = cfg.sources[entry]
        found = load_source(entry, spec, cfg)
    else:
        spec = source_spec(entry, get_task(entry), cfg)
        found = [load_builtin(entry, cfg)]
    return [TaskSplit(task.task, *fallback_split(task, spec, cfg), entry, ", ".join(task.readings)) for task in found]


def cap_examples(examples: list[Example], cap: int | None, seed: int, task: str) -> list[Example]:
    if cap is None or len(examples) <= cap:
        return examples
    keep = sorted(_seeded_order(len(examples), seed, task)[:cap])
    return [examples[i] for i in keep]


def carve_tuning(examples: list[Example], cap: int | None, tuning: int, seed: int,
                 task: str) -> tuple[list[Example], list[Example]]:
    """(train, tuning) of a task's training rows: in one seeded order, the tuning split is the last ``tuning``
    rows and training the first ``cap`` of the rest. With a pool of at least cap + tuning rows, training gets
    the same rows as with no tuning split; a task keeps at least one training row."""
    order = _seeded_order(len(examples), seed, task)
    tuning = min(tuning, max(0, len(order) - 1))
    rest, held = order[:len(order) - tuning], order[len(order) - tuning:]
    return ([examples[i] for i in sorted(rest[:cap] if cap is not None else rest)],
            [examples[i] for i in sorted(held)])


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
        spec = cfg.sources.get(entry)
        caps = (cfg.train_per_task, cfg.eval_per_task) if spec is None else (
            spec.train_per_task if spec.train_per_task is not None else cfg.train_per_task,
            spec.eval_per_task if spec.eval_per_task is not None else cfg.eval_per_task)
        for split in entry_splits(entry, cfg):
            if split.task in origin:
                raise RexftError(f"two tasks are named '{split.task}' (from {origin[split.task]} and {entry}); "
                                 "rename one (a source's task column values are task names)")
            origin[split.task] = entry
            split = as_unseen(split) if unseen else split
            split.train, split.tuning = carve_tuning(split.train, caps[0], 0 if unseen else cfg.tuning_per_task,
                                                     cfg.seed, split.task)
            if len(split.tuning) < (0 if unseen else cfg.tuning_per_task) and split.train:
                log.warning("%s has %d training rows: its tuning split keeps %d of data.tuning_per_task=%d",
                            split.task, len(split.train) + len(split.tuning), len(split.tuning), cfg.tuning_per_task)
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
    files = {}
    for entry in entries:
        spec = data.sources[entry] if entry in data.sources else source_spec(entry, get_task(entry), data)
        paths = source_files(entry, spec, data)
        files.update({str(p.resolve()): {"source": entry, "sha256": sha256(p)} for p in paths})
    return files


def _rows_by_task(examples: list[Example]) -> dict[str, set[int]]:
    rows: dict[str, set[int]] = {}
    for example in examples:
        rows.setdefault(example.task, set()).add(example.row)
    return rows


def split_record(cfg: RunConfig, splits: list[TaskSplit], unseen: list[TaskSplit], train: list[Example],
                 not_scored: list[Example], tuning_not_scored: list[Example] = ()) -> dict:
    """The record ``rexft data`` writes: ``train`` is the kept mixture, ``not_scored`` the eval examples dropped
    (``tuning_not_scored`` the tuning split's)."""
    trained, dropped, tuning_dropped = _rows_by_task(train), _rows_by_task(not_scored), _rows_by_task(tuning_not_scored)
    tasks, unseen_tasks = {}, {s.task for s in unseen}
    for split in splits + unseen:
        tasks[split.task] = {"source": split.source, "kind": split.kind, "unseen": split.task in unseen_tasks,
                             "train_source": split.train_source, "eval_from": split.eval_from,
                             "train_rows": sorted(trained.get(split.task, ())),
                             "eval_rows": [e.row for e in split.eval],
                             "not_scored": sorted(dropped.get(split.task, ())),
                             "tuning_rows": [e.row for e in split.tuning],  # training rows, never trained on
                             "tuning_not_scored": sorted(tuning_dropped.get(split.task, ()))}
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
    # a key added to DataConfig after the record was written reads as its default there
    defaults = {f.name: f.default for f in DataConfig.__dataclass_fields__.values() if not callable(f.default_factory)}
    pairs = [(f"data.{k}", v, then["data"].get(k, defaults.get(k))) for k, v in now["data"].items()]
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

    return [Example(**_current_fields(row)) for row in read_jsonl(path)]


def _current_fields(row: dict) -> dict:
    """A row as Example takes it. Rows written before examples had ``gold`` / ``target`` carry ``answer``: the
    gold letter of a choice example (one with options), else the target text."""
    if "answer" not in row:
        return row
    row = dict(row)
    answer = row.pop("answer")
    if row.get("options"):
        row["gold"] = LETTERS.index(answer)
    else:
        row["target"] = answer
    return row


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
                      entry["train_source"], entry["source"])
            for task, entry in record["tasks"].items() if entry["unseen"] == unseen]


@dataclass
class EvalSet:
    """What eval scores, from the frozen split."""

    examples: list[Example]  # to score
    not_scored: list[Example]  # held out, but dropped by `rexft data` (too long): counted, never scored
    tasks: list[str]  # every task evaluated, also those with no held-out rows (reported, not hidden)
    sources: dict[str, str]  # task -> where its evaluation rows come from
    unseen: set[str]


def tuning_set(cfg: RunConfig, record: dict) -> EvalSet:
    """eval.split=tuning: the held-in tasks' tuning rows (training rows never trained on), less those too long."""
    if not any(entry.get("tuning_rows") for entry in record["tasks"].values()):
        raise RexftError(f"eval.split=tuning: run directory {cfg.path} has no tuning split; set "
                         "data.tuning_per_task=N (training rows per task set aside) and run `rexft data` again")
    names = {s.task for s in select_splits(frozen_splits(cfg, record), cfg.eval.tasks)}
    out = EvalSet([], [], sorted(names, key=list(record["tasks"]).index), {}, set())
    for example in _examples(cfg.path / "data" / "tuning.jsonl"):
        if example.task not in names:
            continue
        skipped = example.row in record["tasks"][example.task]["tuning_not_scored"]
        (out.not_scored if skipped else out.examples).append(example)
        out.sources[example.task] = "tuning rows held out from training"
    return out


def eval_set(cfg: RunConfig) -> EvalSet:
    """Held-in tasks (eval.tasks, or all of data.tasks) and unseen tasks (eval.unseen_tasks): the recorded
    held-out rows, less those `rexft data` found too long (counted, not scored), capped at eval.limit.
    With eval.split=tuning, the tuning split instead (:func:`tuning_set`)."""
    record = read_record(cfg)
    if cfg.eval.split == "tuning":
        return tuning_set(cfg, record)
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
        answer = example.letter if example.kind == "choice" else example.target  # as digests were written before
        rows.setdefault(example.task, []).append([example.row, example.prompt, answer])
    return {task: hashlib.sha256(json.dumps(sorted(r)).encode()).hexdigest()[:12] for task, r in rows.items()}
