"""MultiRC (super_glue/multirc): is the candidate answer correct; label 1 -> A (yes)."""

from rexft.tasks.common import YES_NO, multiple_choice, yes_no

HUB = ("super_glue", "multirc")
HUB_SPLITS = {"train": "train", "validation": "validation"}
FIELDS = {"paragraph": str, "question": str, "answer": str, "label": int}


def to_example(record, check):
    positive = check.label(record["label"], 2) == 1
    question = (f"Question: {record['question']}\nCandidate answer: {record['answer']}\n"
                "Is the candidate answer correct?")
    return multiple_choice(question, YES_NO, yes_no(positive), context=record["paragraph"])
