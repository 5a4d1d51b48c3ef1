"""HellaSwag: the most plausible of four endings; label "0".."3" -> A..D."""

import re

from rexft.tasks.common import continuations, multiple_choice

HUB = ("Rowan/hellaswag", None)
HUB_SPLITS = {"train": "train", "validation": "validation"}
FIELDS = {"activity_label": str, "ctx": str, "endings": list, "label": str}


def to_example(record, check):
    if len(record["endings"]) != 4:
        check.fail(f"field 'endings' should hold 4 endings, has {len(record['endings'])}")
    gold = check.label(record["label"], 4)
    question = f"{record['activity_label']}: {record['ctx']}\nQuestion: Which ending is the most plausible?"
    return multiple_choice(check, question, record["endings"], gold)


def _clean(text: str) -> str:
    """lm-eval's hellaswag preprocess: WikiHow's bracketed artifacts removed."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def to_harness(record, check):
    """lm-eval hellaswag: "activity: context" and each ending as the continuation."""
    if len(record["endings"]) != 4:
        check.fail(f"field 'endings' should hold 4 endings, has {len(record['endings'])}")
    check.fields(record, {"ctx_a": str, "ctx_b": str})
    gold = check.label(record["label"], 4)
    query = _clean(f"{record['activity_label']}: {record['ctx_a']} {record['ctx_b'].capitalize()}")
    return continuations(check, query, [_clean(ending) for ending in record["endings"]], gold)
