"""Task sources: records from local files or the hub, for the user's sources (``data.sources``) and the built-in
tasks alike (a built-in is a preset: its module's spec and record converter, rexft/tasks/common.py).

    TaskSpec -> records of the train / validation splits (local file, folder of split files or hub dataset)
      -> tasks: one, or one per distinct value of ``task_column`` (include / exclude)
      -> Examples through a record converter: the spec's format (rexft/formats.py) or a built-in task's module

A missing split is filled by the one fallback policy, rexft/splits.py ``fallback_split``.

JSON Lines, JSON and CSV files are decoded and parsed here (with the spec's ``encoding``), so every error names
the file and the line as an editor shows it (1-based; a CSV file's header is line 1), and CSV cells stay the text
they are (no number or null guessing). Parquet files and hub datasets are read with ``pyarrow`` / ``datasets``;
their rows are named as 1-based records. A folder's split files follow the names ``datasets`` gives splits
(train / training, validation / valid / dev / val, test / testing / eval / evaluation).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from rexft.config import DataConfig, TaskSpec
from rexft.errors import RexftError
from rexft.formats import FORMATS, needed_columns
from rexft.tasks.common import Checker, Converter, Example

log = logging.getLogger(__name__)
FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Records:
    rows: list[dict]
    where: str  # the file or hub split, for error messages
    positions: list[str] = field(default_factory=list)  # per row: "line 7" or "record 7", 1-based

    def position(self, row: int) -> str:
        return self.positions[row] if row < len(self.positions) else f"record {row + 1}"


def path_candidates(path: str, data: DataConfig, extra: tuple[Path, ...] = ()) -> list[Path]:
    """Where a source path may be: as given (absolute), else the working directory, data.local_dir and ``extra``."""
    given = Path(path).expanduser()
    if given.is_absolute():
        return [given]
    folders = [Path.cwd()] + ([Path(data.local_dir)] if data.local_dir is not None else []) + list(extra)
    return [folder / given for folder in folders]


def resolve_path(label: str, spec: TaskSpec, data: DataConfig) -> Path:
    """The first place the source's path exists; else one error listing every place looked."""
    candidates = path_candidates(spec.path, data)
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        raise RexftError(f"{label}: path {spec.path} not found; looked for {', '.join(map(str, candidates))}")
    return found


def reads_hub(spec: TaskSpec, data: DataConfig) -> bool:
    """Local files when there is a path and data.local_dir is set (or no hub id); the hub otherwise."""
    if spec.hub is None:
        return False
    return spec.path is None or data.local_dir is None


def split_aliases(split: str) -> list[str]:
    """File names a split may have in a folder: ``datasets``' keywords for train / validation / test."""
    from datasets.data_files import SPLIT_KEYWORDS

    return next((list(words) for words in SPLIT_KEYWORDS.values() if split in words), [split])


def split_file(folder: Path, split: str, label: str) -> Path | None:
    """A split inside a folder: the file named exactly, or <alias>.{jsonl,json,csv,parquet}; two candidates are an error."""
    named = folder / split
    if named.is_file():
        return named
    found = [folder / f"{alias}{ext}" for alias in split_aliases(split) for ext in FILE_TYPES
             if (folder / f"{alias}{ext}").is_file()]
    if len(found) > 1:
        raise RexftError(f"{label}: {folder} holds {len(found)} files for split '{split}' "
                         f"({', '.join(p.name for p in found)}); keep one, or name it in train_split / validation_split")
    return found[0] if found else None


def decode(raw: bytes, path: Path, label: str, encoding: str) -> str:
    try:
        return raw.decode("utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise RexftError(f"{label}: {path} is not {encoding} text: byte 0x{raw[err.start]:02x} at offset "
                         f"{err.start} (line {line}); save it as UTF-8, or set {label}.encoding to the "
                         "file's encoding (e.g. cp1252, latin-1)") from None


def json_lines(text: str, path: Path, label: str) -> Records:
    rows, positions = [], []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a string
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise RexftError(f"{label}: {path} line {number} column {err.colno}: not valid JSON "
                             f"({err.msg})") from None
        positions.append(f"line {number}")
    return Records(rows, str(path), positions)


def json_list(text: str, path: Path, label: str) -> Records:
    """A JSON list of records (or JSON Lines saved as .json)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one object per line
            return json_lines(text, path, label)
        raise RexftError(f"{label}: {path} line {err.lineno} column {err.colno}: not valid JSON "
                         f"({err.msg})") from None
    if not isinstance(value, list):
        raise RexftError(f"{label}: {path} holds a JSON {type(value).__name__}; rexft reads a list of "
                         "records ([{...}, ...]) or JSON Lines (one record per line)")
    return Records(value, str(path), [f"record {i + 1}" for i in range(len(value))])


def csv_rows(text: str, path: Path, label: str) -> Records:
    """Every cell as the text it is: "007" stays "007", "NA" and "None" stay words."""
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, positions, header, start = [], [], None, 1
    try:
        for cells in reader:
            if header is None:
                header = cells
            elif len(cells) > len(header):
                raise RexftError(f"{label}: {path} line {start}: {len(cells)} cells, but the header (line 1) "
                                 f"names {len(header)} columns")
            elif cells:  # a blank line is no record; a row of empty cells is one
                rows.append(dict(zip(header, cells)))
                positions.append(f"line {start}")
            start = reader.line_num + 1
    except csv.Error as err:
        raise RexftError(f"{label}: {path} line {reader.line_num}: not valid CSV ({err})") from None
    return Records(rows, str(path), positions)


def read_file(path: Path, label: str, encoding: str = "utf-8") -> Records:
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise RexftError(f"{label}: {path} is not a .jsonl, .json, .csv or .parquet file")
    if kind == "parquet":
        import pyarrow.parquet

        try:
            rows = pyarrow.parquet.read_table(path).to_pylist()
        except Exception as err:  # pyarrow's errors are of several types; the first line names the problem
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RexftError(f"{label}: cannot read {path} ({first})") from None
        records = Records(rows, str(path), [f"record {i + 1}" for i in range(len(rows))])
    else:
        text = decode(path.read_bytes(), path, label, encoding)
        reader = csv_rows if kind == "csv" else json_lines if path.suffix.lower() == ".jsonl" else json_list
        records = reader(text, path, label) if text.strip() else Records([], str(path))
    if not records.rows:
        raise RexftError(f"{label}: file {path} has no rows")
    return records


def read_split(label: str, spec: TaskSpec, data: DataConfig, split: str | None) -> Records | None:
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
            raise RexftError(f"{label}: cannot read hub dataset {spec.hub} ({str(err).splitlines()[0]})") from None
        rows = [dict(r) for r in dataset]
        return Records(rows, f"hub {spec.hub}/{spec.subset or ''}[{split}]", [f"record {i + 1}" for i in range(len(rows))])
    if spec.path is None:
        raise RexftError(f"{label}: give a local `path` or a `hub` dataset id")
    path = resolve_path(label, spec, data)
    if path.is_file():  # one file: it is the training split; evaluation comes from a held-out share
        return read_file(path, label, spec.encoding) if split == spec.train_split else None
    found = split_file(path, split, label)
    return read_file(found, label, spec.encoding) if found is not None else None


def source_files(name: str, spec: TaskSpec, data: DataConfig) -> list[Path]:
    """The local files a source reads ([] for a hub source): what the run directory fingerprints."""
    if reads_hub(spec, data) or spec.path is None:
        return []
    path = resolve_path(f"data.sources.{name}", spec, data)
    if path.is_file():
        return [path]
    found = [split_file(path, split, f"data.sources.{name}") for split in (spec.train_split, spec.validation_split) if split is not None]
    return [p for p in found if p is not None]


def note_unused_files(name: str, spec: TaskSpec, data: DataConfig) -> None:
    """Say which files of a split folder are not read (a test split, a misnamed file)."""
    if reads_hub(spec, data) or spec.path is None or not resolve_path(f"data.sources.{name}", spec, data).is_dir():
        return
    folder = resolve_path(f"data.sources.{name}", spec, data)
    used = set(source_files(name, spec, data))
    unused = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in FILE_TYPES and p not in used)
    if unused:
        log.warning("data.sources.%s: %s also holds %s, which rexft does not read (it reads %s as train / validation; "
                    "name a file in train_split or validation_split to use it)", name, folder, ", ".join(unused),
                    ", ".join(p.name for p in sorted(used)) or "nothing")


@dataclass
class SourceTask:
    task: str
    train: list[Example] | None  # None: the source has no train split
    eval: list[Example] | None  # None: no validation split (the caller holds out part of train)
    readings: list[str] = field(default_factory=list)  # choice: how the answers were read (index, letter, text)


def group_rows(records: Records, name: str, spec: TaskSpec) -> dict[str, list[tuple[int, dict]]]:
    """task name -> [(row, record)], in file order. Task values are stripped of surrounding whitespace."""
    if spec.task_column is None:
        return {name: list(enumerate(records.rows))}
    groups: dict[str, list[tuple[int, dict]]] = {}
    for row, record in enumerate(records.rows):
        if not isinstance(record, dict) or spec.task_column not in record:
            found = ", ".join(sorted(record)) if isinstance(record, dict) else f"a {type(record).__name__}, not an object"
            raise RexftError(f"data.sources.{name}: {records.where} {records.position(row)}: missing task column "
                             f"'{spec.task_column}'; columns found: {found}")
        value = record[spec.task_column]
        if value is None or str(value).strip() == "":
            continue
        groups.setdefault(str(value).strip(), []).append((row, record))
    if not groups:
        raise RexftError(f"data.sources.{name}: task column '{spec.task_column}' has no values in {records.where}")
    return groups


def warn_case_collisions(name: str, tasks: list[str]) -> None:
    by_folded: dict[str, list[str]] = {}
    for task in tasks:
        by_folded.setdefault(task.casefold(), []).append(task)
    for same in (names for names in by_folded.values() if len(names) > 1):
        log.warning("data.sources.%s: task values %s differ only by case and are separate tasks; make them one "
                    "spelling in the file if they are one task", name, " and ".join(repr(t) for t in same))


def format_converter(spec: TaskSpec) -> Converter:
    """The spec's format (rexft/formats.py) as a record converter, its required columns checked first."""
    convert = FORMATS[spec.format]
    required, _ = needed_columns(spec)

    def converted(record: dict, check: Checker) -> Example:
        missing = [c for c in required if c not in record]
        if missing:
            check.fail(f"missing column '{missing[0]}' (format {spec.format}); columns found: {', '.join(sorted(record))}")
        return convert(record, spec, check)

    return converted


def to_examples(rows: list[tuple[int, dict]], task: str, convert: Converter, records: Records) -> tuple[list[Example], list[str]]:
    """The examples of one task's rows and the answer readings used (choice; in first-use order)."""
    examples, readings = [], {}
    for row, record in rows:
        check = Checker(task, records.where, row, records.position(row))
        if not isinstance(record, dict):
            check.fail("record is not an object")
        examples.append(convert(record, check))
        if check.reading is not None:
            readings[check.reading] = True
    return examples, list(readings)


def chosen_tasks(name: str, spec: TaskSpec, tasks: list[str]) -> list[str]:
    """include / exclude / max_tasks applied; a name in include or exclude that is no task is an error."""
    if spec.task_column is None:
        return tasks
    for key, names in (("include", spec.include or []), ("exclude", spec.exclude)):
        unknown = sorted(set(names) - set(tasks))
        if unknown:
            raise RexftError(f"data.sources.{name}.{key} names tasks not in column '{spec.task_column}': {unknown[:5]}")
    tasks = [t for t in tasks if (spec.include is None or t in spec.include) and t not in spec.exclude]
    tasks = tasks[: spec.max_tasks] if spec.max_tasks is not None else tasks
    if not tasks:
        raise RexftError(f"data.sources.{name}: include/exclude leave no task")
    return tasks


def load_source(name: str, spec: TaskSpec, data: DataConfig) -> list[SourceTask]:
    """Every task of one user source with its train and validation examples (None where a split is absent)."""
    if spec.format not in FORMATS:
        raise RexftError(f"data.sources.{name}.format: '{spec.format}' is not one of {', '.join(FORMATS)}")
    found = load_tasks(name, f"data.sources.{name}", spec, data, format_converter(spec))
    note_unused_files(name, spec, data)
    return found


def load_tasks(name: str, label: str, spec: TaskSpec, data: DataConfig, convert: Converter) -> list[SourceTask]:
    """The one read -> convert path of built-in tasks and user sources: the records of the spec's train and
    validation splits, grouped into tasks, each record converted to an :class:`Example`. ``label`` starts every
    error message (data.sources.<name>, or a built-in task's name)."""
    train = read_split(label, spec, data, spec.train_split)
    validation = read_split(label, spec, data, spec.validation_split)
    if train is None and validation is None:
        where = spec.hub if reads_hub(spec, data) else resolve_path(label, spec, data)
        raise RexftError(f"{label}: neither split '{spec.train_split}' nor '{spec.validation_split}' found in {where}")
    train_groups = group_rows(train, name, spec) if train is not None else {}
    eval_groups = group_rows(validation, name, spec) if validation is not None else {}
    tasks = list(dict.fromkeys([*train_groups, *eval_groups]))
    warn_case_collisions(name, tasks)
    out = []
    for task in chosen_tasks(name, spec, tasks):
        found = SourceTask(task, None, None)
        for records, groups, part in ((train, train_groups, "train"), (validation, eval_groups, "eval")):
            if records is not None:
                examples, readings = to_examples(groups.get(task, []), task, convert, records)
                setattr(found, part, examples)
                found.readings += [r for r in readings if r not in found.readings]
        out.append(found)
    return out
