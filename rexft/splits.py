"""The run's frozen split: what ``rexft data`` trained on and held out, read by every later stage.

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
from dataclasses import asdict, dataclass
from pathlib import Path

from rexft.config import DataConfig, RunConfig
from rexft.data import TaskSplit, build_splits, cap_examples, select_splits
from rexft.errors import RexftError
from rexft.tasks.common import Example

log = logging.getLogger(__name__)
VERSION = 1
TRAINING_ONLY = ("packing", "max_dropped_fraction")  # data keys that change no row of the split


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
