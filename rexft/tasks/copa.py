"""COPA (super_glue/copa): choose the cause or effect of the premise; label indexes choice1/choice2."""

from rexft.tasks.common import multiple_choice

HUB = ("super_glue", "copa")
HUB_SPLITS = {"train": "train", "validation": "validation"}
FIELDS = {"premise": str, "choice1": str, "choice2": str, "question": str, "label": int}


def to_example(record, check):
    gold = check.label(record["label"], 2)
    question = f"Premise: {record['premise']}\nQuestion: What was the {record['question']}?"
    return multiple_choice(question, [record["choice1"], record["choice2"]], gold)
