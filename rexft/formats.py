"""The three formats a user's task can take, each written once and reused by every spec (TaskSpec):

    instruction   instruction [+ input] -> output        Alpaca / Tk-Instruct style, rendered by the spec's template
    chat          messages -> the last assistant turn    OpenAI {role, content} or ShareGPT {from, value} turns;
                                                         loss on every assistant turn, the last one is the target
    choice        question + options -> gold option      laid out and scored like the built-in tasks; the answer is
                                                         read as the spec's answer_format (index, letter, text, auto)

A format maps one record (through the spec's column map) to one :class:`Example`, or fails naming the
task, the file, the row and the field.
"""

from __future__ import annotations

from typing import Any, Callable

from rexft.config import TaskSpec
from rexft.tasks.common import LETTERS, Checker, Example, multiple_choice

# Format fields, required ones first; a column map renames them (spec.columns).
FIELDS: dict[str, tuple[list[str], list[str]]] = {
    # format: (required fields, optional fields)
    "instruction": (["instruction", "output"], ["input", "system"]),
    "chat": (["messages"], ["system"]),
    "choice": (["question", "options", "answer"], ["context"]),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system", "bot": "assistant"}


def column_of(spec: TaskSpec, name: str) -> Any:
    """The record column behind format field ``name`` (a list of columns for choice options)."""
    return spec.columns.get(name, name)


def needed_columns(spec: TaskSpec) -> tuple[list[str], list[str]]:
    """(columns every record must have, optional columns) of this spec."""
    required, optional = FIELDS[spec.format]
    if spec.format == "instruction" and "{instruction}" not in spec.template + spec.template_no_input:
        required = ["output"]
    flat = []
    for name in required:
        column = column_of(spec, name)
        flat += list(column) if isinstance(column, (list, tuple)) else [column]
    # An optional field mapped explicitly is required: the user said where it is.
    flat += [column_of(spec, name) for name in optional if name in spec.columns]
    return flat, [column_of(spec, name) for name in optional if name not in spec.columns]


def _text(record: dict, column: str, check: Checker, optional: bool = False) -> str:
    value = record.get(column)
    if value is None:
        if optional:
            return ""
        check.fail(f"missing column '{column}'; columns found: {', '.join(sorted(record))}")
    if not isinstance(value, str):
        check.fail(f"column '{column}' should be text, got {type(value).__name__}")
    return value


def instruction(record: dict, spec: TaskSpec, check: Checker) -> Example:
    text = _text(record, column_of(spec, "instruction"), check, optional="{instruction}" not in spec.template)
    given = _text(record, column_of(spec, "input"), check, optional="input" not in spec.columns)
    output = record.get(column_of(spec, "output"))
    references = [output] if isinstance(output, str) else output
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        check.fail(f"column '{column_of(spec, 'output')}' should be text or a list of texts, got {type(output).__name__}")
    if not references or not references[0].strip():
        check.fail(f"empty target in column '{column_of(spec, 'output')}'")
    system = _text(record, column_of(spec, "system"), check, optional="system" not in spec.columns) or spec.system
    if given.strip():
        # The input is the part truncation may trim: find where the template puts it.
        marker = "\0INPUT\0"
        laid_out = spec.template.replace("{input}", marker).format(instruction=text)
        start = laid_out.find(marker)
        prompt = laid_out.replace(marker, given)
        context = (start, len(given)) if start >= 0 else (0, 0)
    else:
        prompt, context = spec.template_no_input.format(instruction=text), (0, 0)
    return Example(check.task, check.row, prompt, target=references[0], context_chars=context[1],
                   context_start=context[0], references=references, system=system or None)


def chat(record: dict, spec: TaskSpec, check: Checker) -> Example:
    column = column_of(spec, "messages")
    turns = record.get(column)
    if turns is None:
        check.fail(f"missing column '{column}'; columns found: {', '.join(sorted(record))}")
    if not isinstance(turns, list) or not turns:
        check.fail(f"column '{column}' should be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            check.fail(f"turn {i} of '{column}' is not an object")
        role, content = turn.get("role", turn.get("from")), turn.get("content", turn.get("value"))
        if role not in SHAREGPT_ROLES or not isinstance(content, str):
            check.fail(f"turn {i} of '{column}' needs a role (system/user/assistant or human/gpt) and text content, got {turn}")
        messages.append({"role": SHAREGPT_ROLES[role], "content": content})
    system = _text(record, column_of(spec, "system"), check, optional="system" not in spec.columns) or spec.system
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        check.fail(f"the conversation in '{column}' has no assistant turn to train on")
    if not messages[last]["content"].strip():
        check.fail(f"empty target: the last assistant turn in '{column}' is empty")
    before = messages[:last]
    if not any(m["role"] == "user" for m in before):
        check.fail(f"the conversation in '{column}' has no user turn before its last assistant turn")
    prompt = "\n".join(f"{m['role']}: {m['content']}" for m in before if m["role"] != "system")
    return Example(check.task, check.row, prompt, target=messages[last]["content"],
                   references=[messages[last]["content"]], messages=before)


def choice(record: dict, spec: TaskSpec, check: Checker) -> Example:
    column = column_of(spec, "options")
    if isinstance(column, (list, tuple)):  # one column per option (CSV files, MMLU-style)
        options = [record.get(c) for c in column]
    else:
        options = record.get(column)
    if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS) or not all(isinstance(o, str) for o in options):
        check.fail(f"options ('{column}') should be 2 to {len(LETTERS)} texts, got {options!r}")
    answer = record.get(column_of(spec, "answer"))
    if isinstance(answer, bool) or answer is None:
        check.fail(f"missing or invalid answer in column '{column_of(spec, 'answer')}': {answer!r}")
    gold = gold_option(answer, options, spec.answer_format, check)
    question = _text(record, column_of(spec, "question"), check)
    context = _text(record, column_of(spec, "context"), check, optional="context" not in spec.columns)
    return multiple_choice(check, question, options, gold, context)


def answer_readings(answer: Any, options: list[str]) -> dict[str, int]:
    """The gold option under each reading the answer allows: index (0-based), letter, option text."""
    readings = {}
    digits = isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit())
    if digits and 0 <= int(answer) < len(options):
        readings["index"] = int(answer)
    if isinstance(answer, str) and answer.strip() in LETTERS[: len(options)]:
        readings["letter"] = LETTERS.index(answer.strip())
    if isinstance(answer, str) and answer in options:
        readings["text"] = options.index(answer)
    return readings


def gold_option(answer: Any, options: list[str], answer_format: str, check: Checker) -> int:
    """The gold index by the spec's answer_format; ``auto`` refuses an answer whose readings disagree."""
    readings = answer_readings(answer, options)
    wanted = {"index": f"an index 0-{len(options) - 1}", "letter": f"a letter A-{LETTERS[len(options) - 1]}",
              "text": "one of the option texts"}
    if answer_format != "auto":
        if answer_format not in readings:
            check.fail(f"answer {answer!r} is not {wanted[answer_format]} (answer_format: {answer_format}); options: {options}")
        check.reading = answer_format
        return readings[answer_format]
    if not readings:
        check.fail(f"answer {answer!r} is not an option index, letter or option text; options: {options}")
    if len(set(readings.values())) > 1:
        meanings = ", ".join(f"as {kind} {LETTERS[gold]} ({options[gold]!r})" for kind, gold in readings.items())
        check.fail(f"answer {answer!r} is ambiguous: {meanings}; set answer_format (index, letter or text) in "
                   "its data.sources spec")
    check.reading = "=".join(readings)
    return next(iter(readings.values()))


FORMATS: dict[str, Callable[[dict, TaskSpec, Checker], Example]] = {
    "instruction": instruction, "chat": chat, "choice": choice}


def prompt_of_chat(messages: list[dict]) -> str:
    """The text rexft embeds for a conversation: a single user turn as it is, else the turns (system
    aside) as ``role: content`` lines, as rexft's chat-format examples write their prompts."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in turns)
