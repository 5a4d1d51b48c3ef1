"""WSC (super_glue/wsc.fixed): does the pronoun refer to the candidate; label 1 -> A (yes)."""

from rexft.tasks.common import YES_NO, multiple_choice, yes_no

HUB = ("super_glue", "wsc.fixed")
HUB_SPLITS = {"train": "train", "validation": "validation"}
FIELDS = {"text": str, "span1_text": str, "span2_text": str, "label": int}


def to_example(record, check):
    positive = check.label(record["label"], 2) == 1
    question = (f"{record['text']}\nQuestion: In the passage above, does the pronoun "
                f"\"{record['span2_text']}\" refer to \"{record['span1_text']}\"?")
    return multiple_choice(question, YES_NO, yes_no(positive))
