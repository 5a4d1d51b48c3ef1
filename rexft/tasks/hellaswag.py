"""HellaSwag: the most plausible of four endings; label "0".."3" -> A..D."""

from rexft.tasks.common import multiple_choice

HUB = ("Rowan/hellaswag", None)
HUB_SPLITS = {"train": "train", "validation": "validation"}
FIELDS = {"activity_label": str, "ctx": str, "endings": list, "label": str}


def to_example(record, check):
    if len(record["endings"]) != 4:
        check.fail(f"field 'endings' should hold 4 endings, has {len(record['endings'])}")
    gold = check.label(record["label"], 4)
    question = f"{record['activity_label']}: {record['ctx']}\nQuestion: Which ending is the most plausible?"
    return multiple_choice(question, record["endings"], gold)
