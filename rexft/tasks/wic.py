"""WiC (super_glue/wic): is the word used in the same sense in both sentences; label 1 -> A (yes)."""

from rexft.tasks.common import YES_NO, continuations, multiple_choice, yes_no

HUB = ("super_glue", "wic")
HUB_SPLITS = {"train": "train", "validation": "validation"}
FIELDS = {"word": str, "sentence1": str, "sentence2": str, "label": int}


def to_example(record, check):
    positive = check.label(record["label"], 2) == 1
    question = (f"Sentence 1: {record['sentence1']}\nSentence 2: {record['sentence2']}\n"
                f"Question: Is the word \"{record['word']}\" used with the same meaning in both sentences?")
    return multiple_choice(check, question, YES_NO, yes_no(positive))


def to_harness(record, check):
    """lm-eval wic: the word as it is spelled in sentence 1 (start1:end1); options [no, yes]."""
    check.fields(record, {"start1": int, "end1": int})
    gold = check.label(record["label"], 2)
    word = record["sentence1"][record["start1"]:record["end1"]]
    text = (f"Sentence 1: {record['sentence1']}\nSentence 2: {record['sentence2']}\nQuestion: Is the word "
            f"'{word}' used in the same way in the two sentences above?\nAnswer:")
    return continuations(check, text, ["no", "yes"], gold)
