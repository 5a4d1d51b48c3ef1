"""ANLI round 1: label 0 entailment -> A, 1 neutral -> B, 2 contradiction -> C."""

from rexft.tasks.common import continuations, multiple_choice

HUB = ("anli", None)
HUB_SPLITS = {"train": "train_r1", "validation": "dev_r1"}
FIELDS = {"premise": str, "hypothesis": str, "label": int}


def to_example(record, check):
    gold = check.label(record["label"], 3)
    question = (f"Hypothesis: {record['hypothesis']}\nQuestion: Does the premise entail the hypothesis, "
                "is it neutral, or does it contradict it?")
    return multiple_choice(check, question, ["entailment", "neutral", "contradiction"], gold, context=record["premise"])


def to_harness(record, check):
    """lm-eval anli_r1: True = entailment, Neither = neutral, False = contradiction."""
    gold = check.label(record["label"], 3)
    text = f"{record['premise']}\nQuestion: {record['hypothesis']} True, False, or Neither?\nAnswer:"
    return continuations(check, text, ["True", "Neither", "False"], gold, context_chars=len(record["premise"]) + 1)
