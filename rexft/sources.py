"""The user's task sources (``data.sources``): records from local files or the hub, read with ``datasets``.

    TaskSpec (config) -> records of the train / validation splits (local file, folder or hub dataset)
      -> tasks: one, or one per distinct value of ``task_column`` (include / exclude)
      -> Examples through the spec's format (rexft/formats.py)

Errors name the source, the file and the column: a missing file or column, a task column with no values,
an unreadable file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rexft.config import DataConfig, TaskSpec
from rexft.errors import RexftError
from rexft.formats import FORMATS, needed_columns
from rexft.tasks.common import Checker, Example

log = logging.getLogger(__name__)
FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Records:
    rows: list[dict]
    where: str  # the file or hub split, for error messages


def resolve_path(spec: TaskSpec, data: DataConfig) -> Path:
    path = Path(spec.path).expanduser()
    if path.exists() or path.is_absolute() or data.local_dir is None:
        return path
    return Path(data.local_dir) / path


def reads_hub(spec: TaskSpec, data: DataConfig) -> bool:
    """Local files when there is a path and data.local_dir is set (or no hub id); the hub otherwise."""
    if spec.hub is None:
        return False
    return spec.path is None or data.local_dir is None


def split_file(folder: Path, split: str) -> Path | None:
    """A split inside a folder: the file named exactly, or <split>.{jsonl,json,csv,parquet}."""
    named = folder / split
    if named.is_file():
        return named
    return next((folder / f"{split}{ext}" for ext in FILE_TYPES if (folder / f"{split}{ext}").is_file()), None)


def read_file(path: Path, name: str) -> Records:
    import datasets

    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise RexftError(f"data.sources.{name}: {path} is not a .jsonl, .json, .csv or .parquet file")
    try:
        dataset = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps parse errors in several types; the first line names the problem
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RexftError(f"data.sources.{name}: cannot read {path} ({first})") from None
    return Records(dataset.to_list(), str(path))


def read_split(name: str, spec: TaskSpec, data: DataConfig, split: str | None) -> Records | None:
    """Records of one split, or None when the source has no such split."""
    if split is None:
        return None
    if reads_hub(spec, data):
        import datasets

        try:
            dataset = datasets.load_dataset(spec.hub, spec.subset, split=split)
        except ValueError as err:
            if "split" in str(err).lower():  # unknown split name: the source has no such split
                return None
            raise RexftError(f"data.sources.{name}: cannot read hub dataset {spec.hub} ({str(err).splitlines()[0]})") from None
        return Records([dict(r) for r in dataset], f"hub {spec.hub}/{spec.subset or ''}[{split}]")
    if spec.path is None:
        raise RexftError(f"data.sources.{name}: give a local `path` or a `hub` dataset id")
    path = resolve_path(spec, data)
    if path.is_file():  # one file: it is the training split; evaluation comes from a held-out share
        return read_file(path, name) if split == spec.train_split else None
    if not path.is_dir():
        raise RexftError(f"data.sources.{name}: path {path} does not exist")
    found = split_file(path, split)
    return read_file(found, name) if found is not None else None


@dataclass
class SourceTask:
    task: str
    train: list[Example] | None  # None: the source has no train split
    eval: list[Example] | None  # None: no validation split (the caller holds out part of train)


def group_rows(records: Records, name: str, spec: TaskSpec) -> dict[str, list[tuple[int, dict]]]:
    """task name -> [(row, record)], in file order."""
    if spec.task_column is None:
        return {name: list(enumerate(records.rows))}
    groups: dict[str, list[tuple[int, dict]]] = {}
    for row, record in enumerate(records.rows):
        if spec.task_column not in record:
            raise RexftError(f"data.sources.{name}: {records.where} row {row}: missing task column '{spec.task_column}'; "
                             f"columns found: {', '.join(sorted(record))}")
        value = record[spec.task_column]
        if value is None or str(value).strip() == "":
            continue
        groups.setdefault(str(value), []).append((row, record))
    if not groups:
        raise RexftError(f"data.sources.{name}: task column '{spec.task_column}' has no values in {records.where}")
    return groups


def to_examples(rows: list[tuple[int, dict]], task: str, spec: TaskSpec, where: str) -> list[Example]:
    convert = FORMATS[spec.format]
    required, _ = needed_columns(spec)
    examples = []
    for row, record in rows:
        check = Checker(task, where, row)
        if not isinstance(record, dict):
            check.fail("record is not an object")
        missing = [c for c in required if c not in record]
        if missing:
            check.fail(f"missing column '{missing[0]}' (format {spec.format}); columns found: {', '.join(sorted(record))}")
        examples.append(convert(record, spec, check, task, row))
    return examples


def load_source(name: str, spec: TaskSpec, data: DataConfig) -> list[SourceTask]:
    """Every task of one source with its train and validation examples (None where a split is absent)."""
    if spec.format not in FORMATS:
        raise RexftError(f"data.sources.{name}.format: '{spec.format}' is not one of {', '.join(FORMATS)}")
    train = read_split(name, spec, data, spec.train_split)
    validation = read_split(name, spec, data, spec.validation_split)
    if train is None and validation is None:
        where = spec.hub if reads_hub(spec, data) else resolve_path(spec, data)
        raise RexftError(f"data.sources.{name}: neither split '{spec.train_split}' nor '{spec.validation_split}' found in {where}")
    train_groups = group_rows(train, name, spec) if train is not None else {}
    eval_groups = group_rows(validation, name, spec) if validation is not None else {}
    tasks = list(dict.fromkeys([*train_groups, *eval_groups]))
    if spec.task_column is not None:
        unknown = sorted(set(spec.include or []) - set(tasks))
        if unknown:
            raise RexftError(f"data.sources.{name}.include names tasks not in column '{spec.task_column}': {unknown[:5]}")
        tasks = [t for t in tasks if (spec.include is None or t in spec.include) and t not in spec.exclude]
        tasks = tasks[: spec.max_tasks] if spec.max_tasks is not None else tasks
        if not tasks:
            raise RexftError(f"data.sources.{name}: include/exclude leave no task")
    out = []
    for task in tasks:
        out.append(SourceTask(
            task,
            to_examples(train_groups.get(task, []), task, spec, train.where) if train is not None else None,
            to_examples(eval_groups.get(task, []), task, spec, validation.where) if validation is not None else None))
    return out
