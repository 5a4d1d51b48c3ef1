"""PIQA: the better solution for the goal; label indexes sol1/sol2."""

from rexft.tasks.common import continuations, multiple_choice

HUB = ("ybisk/piqa", None)
HUB_SPLITS = {"train": "train", "validation": "validation"}
FIELDS = {"goal": str, "sol1": str, "sol2": str, "label": int}


def to_example(record, check):
    gold = check.label(record["label"], 2)
    return multiple_choice(check, f"Goal: {record['goal']}\nQuestion: Which solution is better?",
                           [record["sol1"], record["sol2"]], gold)


def to_harness(record, check):
    """lm-eval piqa."""
    gold = check.label(record["label"], 2)
    return continuations(check, f"Question: {record['goal']}\nAnswer:", [record["sol1"], record["sol2"]], gold)
