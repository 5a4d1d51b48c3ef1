"""WiC (super_glue/wic): is the word used in the same sense in both sentences; label 1 -> A (yes)."""

from rexft.tasks.common import YES_NO, multiple_choice, yes_no

HUB = ("super_glue", "wic")
HUB_SPLITS = {"train": "train", "validation": "validation"}
FIELDS = {"word": str, "sentence1": str, "sentence2": str, "label": int}


def to_example(record, check):
    positive = check.label(record["label"], 2) == 1
    question = (f"Sentence 1: {record['sentence1']}\nSentence 2: {record['sentence2']}\n"
                f"Question: Is the word \"{record['word']}\" used with the same meaning in both sentences?")
    return multiple_choice(question, YES_NO, yes_no(positive))
