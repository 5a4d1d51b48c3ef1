"""ANLI round 1: label 0 entailment -> A, 1 neutral -> B, 2 contradiction -> C."""

from rexft.tasks.common import multiple_choice

HUB = ("anli", None)
HUB_SPLITS = {"train": "train_r1", "validation": "dev_r1"}
FIELDS = {"premise": str, "hypothesis": str, "label": int}


def to_example(record, check):
    gold = check.label(record["label"], 3)
    question = (f"Hypothesis: {record['hypothesis']}\nQuestion: Does the premise entail the hypothesis, "
                "is it neutral, or does it contradict it?")
    return multiple_choice(question, ["entailment", "neutral", "contradiction"], gold, context=record["premise"])
