"""OpenBookQA (main): four choices; answerKey is the gold choice's label."""

from rexft.tasks.common import continuations, keyed_choices, multiple_choice

HUB = ("allenai/openbookqa", "main")
HUB_SPLITS = {"train": "train", "validation": "validation"}
FIELDS = {"question_stem": str, "choices": dict, "answerKey": str}


def to_example(record, check):
    texts, gold = keyed_choices(record, check)
    return multiple_choice(check, f"Question: {record['question_stem']}", texts, gold)


def to_harness(record, check):
    """lm-eval openbookqa: the bare question stem, each choice as the continuation."""
    texts, gold = keyed_choices(record, check)
    return continuations(check, record["question_stem"], texts, gold)
