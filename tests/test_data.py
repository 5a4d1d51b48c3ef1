"""Task loaders on real records: gold letters, options, prompts, schema errors, mixture, tokenization."""

import hashlib
import json

import pytest

from rexft.config import DataConfig, ModelConfig
from rexft.data import IGNORE_INDEX, PromptFormat, encode_example
from rexft.sources import read_file
from rexft.splits import build_splits, mixture
from rexft.errors import RexftError
from rexft.modeling import byte_tokenizer
from rexft.tasks import task_names
from rexft.tasks.common import LETTERS

from conftest import validation_examples

ALL_TASKS = task_names()


def raw_gold_text(task: str, record: dict) -> str:
    """The gold answer's text straight from the raw record, independent of the loaders."""
    yes_no = {True: "yes", False: "no"}
    if task in ("boolq", "wic", "wsc", "multirc"):
        return yes_no[record["label"] == 1]
    if task == "rte":
        return yes_no[record["label"] == 0]
    if task == "anli":
        return ["entailment", "neutral", "contradiction"][record["label"]]
    if task == "copa":
        return [record["choice1"], record["choice2"]][record["label"]]
    if task == "winogrande":
        return record["option" + record["answer"]]
    if task == "hellaswag":
        return record["endings"][int(record["label"])]
    if task == "piqa":
        return [record["sol1"], record["sol2"]][record["label"]]
    if task == "social_i_qa":
        return record["answer" + "ABC"[int(record["label"]) - 1]]
    if task in ("openbookqa", "commonsense_qa"):
        return record["choices"]["text"][record["choices"]["label"].index(record["answerKey"])]
    if task == "mmlu":
        return record["choices"][record["answer"]]
    raise AssertionError(task)


QUESTION_FIELD = {"boolq": "question", "wic": "word", "wsc": "span2_text", "rte": "hypothesis", "copa": "premise",
                  "multirc": "question", "winogrande": "sentence", "anli": "hypothesis", "hellaswag": "ctx",
                  "piqa": "goal", "social_i_qa": "question", "openbookqa": "question_stem", "mmlu": "question",
                  "commonsense_qa": "question"}
N_OPTIONS = {"anli": 3, "hellaswag": 4, "social_i_qa": 3, "openbookqa": 4, "mmlu": 4, "commonsense_qa": 5}


def test_all_fourteen_tasks_are_registered():
    assert len(ALL_TASKS) == 14


@pytest.mark.parametrize("task", ALL_TASKS)
def test_gold_letter_points_at_the_raw_label(task, data_dir):
    records = read_file(data_dir / task / "validation.jsonl", task).rows
    examples = validation_examples(task, str(data_dir))
    assert len(examples) == len(records) > 0
    for example, record in list(zip(examples, records))[:300]:
        assert example.options[example.gold] == raw_gold_text(task, record)
        assert len(example.options) == N_OPTIONS.get(task, 2)
        assert record[QUESTION_FIELD[task]].strip()[:40] in example.prompt
        for i, option in enumerate(example.options):  # every option is lettered in the prompt
            assert f"{LETTERS[i]}. {option}" in example.prompt


def test_binary_convention_puts_the_positive_reading_first(data_dir):
    for task in ("boolq", "wic", "wsc", "rte", "multirc"):
        assert validation_examples(task, str(data_dir))[0].options == ["yes", "no"]


def _write(tmp_path, task, rows):
    (tmp_path / task).mkdir(parents=True, exist_ok=True)
    (tmp_path / task / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_missing_field_names_task_file_and_row(tmp_path):
    _write(tmp_path, "copa", [{"premise": "p", "choice1": "a", "choice2": "b", "question": "cause", "label": 0},
                              {"premise": "p", "choice1": "a", "question": "cause", "label": 0}])
    with pytest.raises(RexftError, match=r"copa: .*copa/validation.jsonl line 2: missing field 'choice2'"):
        validation_examples("copa", str(tmp_path))


def test_out_of_range_label_names_the_row(tmp_path):
    _write(tmp_path, "anli", [{"premise": "p", "hypothesis": "h", "label": 3}])
    with pytest.raises(RexftError, match=r"anli: .* line 1: label 3 is out of range for 3 options"):
        validation_examples("anli", str(tmp_path))


def test_missing_task_folder_is_named(tmp_path):
    with pytest.raises(RexftError, match="piqa: path .*piqa not found"):
        build_splits(DataConfig(tasks=["piqa"], local_dir=str(tmp_path)))


def test_tasks_without_train_split_use_disjoint_validation_parts(data_dir):
    (split,) = build_splits(DataConfig(tasks=["piqa"], local_dir=str(data_dir)))
    train_rows, eval_rows = {e.row for e in split.train}, {e.row for e in split.eval}
    assert not train_rows & eval_rows
    assert len(train_rows) + len(eval_rows) == 1838
    assert split.train_source.startswith("validation")


def test_mixture_is_deterministic_and_respects_caps(data_dir):
    cfg = DataConfig(tasks=ALL_TASKS, local_dir=str(data_dir), train_per_task=20, seed=3)
    first = mixture(build_splits(cfg), cfg)
    again = mixture(build_splits(cfg), cfg)
    assert [(e.task, e.row) for e in first] == [(e.task, e.row) for e in again]
    counts = {t: sum(e.task == t for e in first) for t in ALL_TASKS}
    assert all(c == 20 for c in counts.values())
    other = DataConfig(tasks=ALL_TASKS, local_dir=str(data_dir), train_per_task=20, seed=4)
    assert [(e.task, e.row) for e in mixture(build_splits(other), other)] != [(e.task, e.row) for e in first]


def test_temperature_mixture_flattens_task_sizes(data_dir):
    cfg = DataConfig(tasks=["copa", "winogrande"], local_dir=str(data_dir), mixture="temperature", temperature=100.0,
                     mixture_size=1000)
    mixed = mixture(build_splits(cfg), cfg)
    copa = sum(e.task == "copa" for e in mixed)
    assert len(mixed) == 1000 and 400 < copa < 600  # 400 vs 10234 examples, near-uniform at T=100


def test_labels_mask_everything_but_the_answer(data_dir):
    tok = byte_tokenizer()
    fmt = PromptFormat.for_model(tok, ModelConfig(use_chat_template=False))
    example = validation_examples("copa", str(data_dir))[0]
    row = encode_example(example, tok, fmt, 512)
    answer = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert tok.decode(answer) == f" {example.letter}</s>"
    assert row["labels"][: row["prompt_length"]] == [IGNORE_INDEX] * row["prompt_length"]


def test_truncation_trims_the_passage_never_options_or_answer(data_dir):
    tok = byte_tokenizer()
    fmt = PromptFormat.for_model(tok, ModelConfig(use_chat_template=False))
    example = max(validation_examples("boolq", str(data_dir))[:50], key=lambda e: len(e.prompt))
    row = encode_example(example, tok, fmt, 200)
    text = tok.decode(row["input_ids"])
    assert len(row["input_ids"]) <= 200 and row["truncated"]
    assert text.endswith(f"A. yes\nB. no\nAnswer: {example.letter}</s>")
    assert "Question:" in text


def test_tokenized_mixture_is_cached_on_disk(data_dir, tmp_path, monkeypatch):
    import rexft.data as data

    cfg = DataConfig(tasks=["copa", "rte"], local_dir=str(data_dir), train_per_task=10)
    examples = mixture(build_splits(cfg), cfg)
    tok = byte_tokenizer()
    fmt = PromptFormat.for_model(tok, ModelConfig(use_chat_template=False))
    first = data.tokenize_examples(examples, tok, fmt, 256, tmp_path)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(data, "encode_example", no_tokenizing)
    assert data.tokenize_examples(examples, tok, fmt, 256, tmp_path) == first
    with pytest.raises(AssertionError, match="cache should have answered"):  # another max_length is another key
        data.tokenize_examples(examples, tok, fmt, 128, tmp_path)


def test_hub_path_maps_ids_and_splits_and_matches_local_files(data_dir, monkeypatch):
    """The hub is unreachable here: serve the hub call from the local file through datasets' JSON builder."""
    import datasets

    asked = []
    real_load = datasets.load_dataset

    def fake_hub(path, name=None, split=None, **kwargs):
        asked.append((path, name, split))
        local = {"dev_r1": "validation", "train_r1": "train"}.get(split, split)
        file = data_dir / "anli" / f"{local}.jsonl"
        if not file.is_file():
            raise ValueError(f"Unknown split {split}")
        return real_load("json", data_files=str(file), split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    from_hub = validation_examples("anli", None)
    assert asked == [("anli", None, "train_r1"), ("anli", None, "dev_r1")]  # train first; no train_r1 served
    assert [e.to_dict() for e in from_hub][:50] == [e.to_dict() for e in validation_examples("anli", str(data_dir))][:50]
    (split,) = build_splits(DataConfig(tasks=["anli"], local_dir=None))  # no train_r1 served: validation is split
    assert ("anli", None, "train_r1") in asked[2:] and split.train_source.startswith("validation")


# Digests of the first 5 validation examples (task, row, prompt, options, gold letter, trimmable context), pinned
# from the loaders before built-in tasks were read through the source path: a change to any prompt is caught here.
PINNED = {("chat", "boolq"): "bcc5bedea201727a", ("chat", "hellaswag"): "015fe65d2b05b091",
          ("chat", "mmlu"): "08eaf99ad2e32c5e", ("harness", "boolq"): "3d2a7bc89c22b146",
          ("harness", "hellaswag"): "16ef6a1b3efc1892", ("harness", "mmlu"): "88b1a4b106257ab9"}


@pytest.mark.parametrize("style, task", sorted(PINNED))
def test_builtin_examples_match_their_pinned_digest(style, task, data_dir):
    rows = [[e.task, e.row, e.prompt, e.options, e.letter, e.context_chars]
            for e in validation_examples(task, data_dir, style)[:5]]
    assert hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16] == PINNED[style, task]


def test_rows_written_before_gold_and_target_are_read_as_they_meant(tmp_path):
    """A run directory from before Example had gold / target (rows with `answer`) keeps working."""
    from rexft.splits import _examples

    rows = [{"task": "boolq", "row": 3, "prompt": "Q?\nA. yes\nB. no", "options": ["yes", "no"], "answer": "B"},
            {"task": "sni", "row": 5, "prompt": "Say hi", "options": [], "answer": "hi", "references": ["hi", "hello"]}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    choice, generative = _examples(path)
    assert (choice.kind, choice.gold, choice.letter, choice.target) == ("choice", 1, "B", None)
    assert (generative.kind, generative.gold, generative.target) == ("generate", None, "hi")
