"""Property test of the source readers: any record, in any of the four file types, encodings and column maps,
with options and answers in any form, becomes exactly the example it describes or is refused with one line."""

import csv
import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rexft.config import DataConfig, TaskSpec
from rexft.splits import build_splits
from rexft.errors import RexftError
from rexft.tasks.common import LETTERS

TEXT = st.text(st.characters(codec="cp1252", exclude_categories=("Cc", "Cs")) | st.sampled_from("\n\t\r"), max_size=12)
KINDS = {".jsonl", ".json", ".csv", ".parquet"}


def write(path: Path, record: dict, encoding: str) -> None:
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet

        pyarrow.parquet.write_table(pyarrow.Table.from_pylist([record]), path)
        return
    if path.suffix == ".csv":
        out = io.StringIO(newline="")
        writer = csv.writer(out)
        writer.writerow(list(record))
        writer.writerow([str(v) for v in record.values()])
        text = out.getvalue()
    elif path.suffix == ".json":
        text = json.dumps([record], ensure_ascii=False, indent=1)
    else:
        text = json.dumps(record, ensure_ascii=False) + "\n"
    path.write_bytes(text.encode(encoding))


@st.composite
def choice_records(draw):
    """(record, spec, file suffix, encoding, option texts, intended gold, whether the spec names the form)."""
    suffix = draw(st.sampled_from(sorted(KINDS)))
    options = draw(st.lists(TEXT, min_size=2, max_size=5))
    gold = draw(st.integers(0, len(options) - 1))
    form = draw(st.sampled_from(["index", "index-string", "letter", "text"]))
    answer = {"index": gold, "index-string": str(gold), "letter": LETTERS[gold], "text": options[gold]}[form]
    declared = draw(st.booleans())
    names = draw(st.sampled_from([{}, {"question": "Frage", "answer": "Lösung"}]))
    question_column, answer_column = names.get("question", "question"), names.get("answer", "answer")
    record = {question_column: draw(TEXT), answer_column: answer}
    columns = dict(names)
    if suffix == ".csv" or draw(st.booleans()):  # one column per option (the only way a CSV file holds options)
        columns["options"] = [f"option {i}" for i in range(len(options))]
        record.update(zip(columns["options"], options))
    else:
        columns["options"] = "choices"
        record["choices"] = options
    answer_format = form.split("-")[0] if declared else "auto"
    spec = TaskSpec(format="choice", path=f"r{suffix}", columns=columns, answer_format=answer_format,
                    encoding=draw(st.sampled_from(["utf-8", "cp1252"])))
    return record, spec, options, gold, declared


@st.composite
def instruction_records(draw):
    suffix = draw(st.sampled_from(sorted(KINDS)))
    names = draw(st.sampled_from([{}, {"instruction": "prompt", "output": "réponse"}]))
    record = {names.get("instruction", "instruction"): draw(TEXT), names.get("output", "output"): draw(TEXT)}
    spec = TaskSpec(format="instruction", path=f"r{suffix}", columns=names, encoding=draw(st.sampled_from(["utf-8", "cp1252"])))
    return record, spec


def read_back(record: dict, spec: TaskSpec):
    """The examples rexft makes of a one-record file, or the error's one line."""
    with tempfile.TemporaryDirectory() as folder:
        write(Path(folder) / spec.path, record, spec.encoding)
        try:
            (split,) = build_splits(DataConfig(tasks=["r"], sources={"r": spec}, local_dir=folder))
        except RexftError as err:
            message = str(err)
            assert "\n" not in message.strip() and spec.path in message, message
            return None
    return split.train + split.eval


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(choice_records())
def test_a_choice_record_is_its_example_or_one_clear_line(drawn):
    record, spec, options, gold, declared = drawn
    examples = read_back(record, spec)
    if examples is None:
        assert not declared, "a record that states its answer form must be read"
        return
    (example,) = examples
    assert example.options == options  # in order, byte-identical
    assert example.options[example.gold] == options[gold]  # the gold is the intended option's text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instruction_records())
def test_an_instruction_record_is_its_example_or_one_clear_line(drawn):
    record, spec = drawn
    instruction, output = record.values()
    examples = read_back(record, spec)
    if examples is None:
        assert not output.strip(), "only an empty target is refused"
        return
    (example,) = examples
    assert example.target == output and example.prompt == instruction  # byte-identical
