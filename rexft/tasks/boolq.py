"""BoolQ (super_glue/boolq): yes/no question about a passage; label 1 = true -> A (yes)."""

from rexft.tasks.common import YES_NO, continuations, multiple_choice, yes_no

HUB = ("super_glue", "boolq")
HUB_SPLITS = {"train": "train", "validation": "validation"}
FIELDS = {"question": str, "passage": str, "label": int}


def to_example(record, check):
    positive = check.label(record["label"], 2) == 1
    return multiple_choice(check, f"Question: {record['question']}?", YES_NO, yes_no(positive), context=record["passage"])


def to_harness(record, check):
    """lm-eval boolq: options [no, yes], so label 1 (true) is the second."""
    gold = check.label(record["label"], 2)
    text = f"{record['passage']}\nQuestion: {record['question']}?\nAnswer:"
    return continuations(check, text, ["no", "yes"], gold, context_chars=len(record["passage"]) + 1)
