"""What every task loader shares: the example type, schema checks and the multiple-choice prompt layout.

A built-in task is a preset of the source path (rexft/sources.py): a module under rexft/tasks/ defines its spec
    HUB = (path, name)                  the dataset on the Hugging Face hub
    HUB_SPLITS = {"train": ..., "validation": ...}   hub split names behind the local file names
    FIELDS = {field: type, ...}         the record schema the loader checks
and its record converters
    def to_example(record, check) -> Example   via ``multiple_choice``
    def to_harness(record, check) -> Example   via ``continuations``
and nothing else. Its records are read like a user's local JSONL source, <local_dir>/<task>/{train,validation}.jsonl
(or the hub's HUB_SPLITS when data.local_dir is null): :func:`source_spec`. Two prompt styles (``data.prompt_style``):

chat (``to_example``): ``context`` (a passage that truncation may trim) followed by the question and the
lettered options, rendered with the model's chat template; binary tasks always put the positive reading
first: A = yes / true / entailment, B = no / false / not entailment. The answer trained on is the letter.

harness (``to_harness``): lm-evaluation-harness's own zero-shot format for the task (its task YAML's
doc_to_text, doc_to_choice and doc_to_target, mirrored in rexft/harness/tasks/): plain text ending in
"Answer:" or the like, no chat template, and each option is the continuation lm-eval scores after it,
its target delimiter included (" yes"), in lm-eval's option order (boolq: no, yes). The answer trained
on is the gold continuation. Scored with ``eval.protocol=loglik``, as lm-eval scores it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

from rexft.config import DataConfig, TaskSpec
from rexft.errors import RexftError

LETTERS = "ABCDEFGHIJ"


@dataclass
class Example:
    """One example of any task. A choice example has options and the gold option's index; a generative example
    has a target text (and maybe more references). Stages ask ``kind`` rather than look at task names.

    The prompt is the user text the model answers; for chat examples it is the conversation before the
    target turn written out as text (what the sentence embedder sees), and ``messages`` holds the turns.
    """

    task: str
    row: int  # 0-based position of the record in its split (file line / hub row)
    prompt: str  # choice: context + question + lettered options; generative: the prompt (no target)
    options: list[str] = field(default_factory=list)  # choice: option texts in letter order; generative: []
    gold: Optional[int] = None  # choice: index of the gold option (its letter is LETTERS[gold]); generative: None
    target: Optional[str] = None  # generative: the target text the loss is on; choice: None
    context_chars: int = 0  # prompt[context_start:context_start + context_chars] may be trimmed to fit max_length
    context_start: int = 0
    references: Optional[list[str]] = None  # generative: every acceptable output (the target is the first)
    messages: Optional[list[dict]] = None  # chat: the turns before the target turn ({role, content}, system first)
    system: Optional[str] = None  # instruction: a system text for the chat template
    prompt_style: str = "chat"  # harness: lm-eval's plain-text prompt, options are continuations (see above)

    @property
    def kind(self) -> str:
        return "choice" if self.gold is not None else "generate"

    @property
    def letter(self) -> str:
        """A choice example's gold letter: what a chat-style choice example is trained to answer."""
        return LETTERS[self.gold]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Checker:
    """Schema checks that name the task, the file and the row of a bad record."""

    task: str
    source: str
    row: int  # 0-based record index
    position: str = ""  # where the record is, as its file counts: "line 7" (an editor's line), "record 7" (1-based)
    reading: Optional[str] = None  # choice: how the record's answer was read (index, letter or text)

    def fail(self, message: str):
        raise RexftError(f"{self.task}: {self.source} {self.position or f'record {self.row + 1}'}: {message}")

    def fields(self, record: dict, schema: dict) -> None:
        for name, kind in schema.items():
            if name not in record or record[name] is None:
                self.fail(f"missing field '{name}'")
            if not isinstance(record[name], kind):
                self.fail(f"field '{name}' should be {getattr(kind, '__name__', kind)}, got {type(record[name]).__name__}")

    def label(self, value, n_options: int, base: int = 0) -> int:
        """An int-like label (int or digit string) in [base, base + n_options)."""
        try:
            index = int(value) - base
        except (TypeError, ValueError):
            self.fail(f"label {value!r} is not a number")
        if not 0 <= index < n_options:
            self.fail(f"label {value!r} is out of range for {n_options} options")
        return index


def multiple_choice(check: Checker, question: str, options: list[str], gold: int, context: str = "") -> Example:
    """The chat-style choice example of the checked record: the context (trimmable) and the question, then
    the lettered options."""
    context_block = f"{context}\n" if context else ""
    lettered = "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(options))
    return Example(check.task, check.row, f"{context_block}{question}\n{lettered}", list(options), gold,
                   context_chars=len(context_block))


def continuations(check: Checker, text: str, choices: list[str], gold: int, context_chars: int = 0,
                  delimiter: str = " ") -> Example:
    """The harness-style example of the checked record. Each option is ``delimiter + choice``, the continuation
    lm-eval scores after ``text`` (its ``target_delimiter``); ``text[:context_chars]`` is a passage that
    truncation may trim."""
    return Example(check.task, check.row, text, [f"{delimiter}{choice}" for choice in choices], gold,
                   context_chars=context_chars, prompt_style="harness")


YES_NO = ["yes", "no"]


def yes_no(positive: bool) -> int:
    return 0 if positive else 1


def keyed_choices(record: dict, check: Checker) -> tuple[list[str], int]:
    """``choices = {label: [...], text: [...]}`` with ``answerKey`` naming the gold label."""
    labels, texts = record["choices"].get("label"), record["choices"].get("text")
    if not labels or not texts or len(labels) != len(texts):
        check.fail("field 'choices' needs equal-length 'label' and 'text' lists")
    if record["answerKey"] not in labels:
        check.fail(f"label {record['answerKey']!r} is out of range for choices {labels}")
    return texts, labels.index(record["answerKey"])


Converter = Callable[[dict, Checker], Example]  # one record (checked as it is read) -> its example


def source_spec(task: str, module: ModuleType, data: DataConfig) -> TaskSpec:
    """Where a built-in task's records come from, as a source: the local folder <local_dir>/<task> and its
    train.jsonl / validation.jsonl (named exactly: mmlu's folder also holds dev.jsonl), or the hub's splits."""
    hub, subset = module.HUB
    if data.local_dir is None:
        return TaskSpec(hub=hub, subset=subset, train_split=module.HUB_SPLITS["train"],
                        validation_split=module.HUB_SPLITS["validation"])
    return TaskSpec(path=str(Path(data.local_dir) / task), hub=hub, subset=subset,
                    train_split="train.jsonl", validation_split="validation.jsonl")


def converter(module: ModuleType, prompt_style: str) -> Converter:
    """A built-in task's record converter in a prompt style, its schema (FIELDS) checked first."""
    layout = module.to_harness if prompt_style == "harness" else module.to_example

    def convert(record: dict, check: Checker) -> Example:
        check.fields(record, module.FIELDS)
        return layout(record, check)

    return convert
