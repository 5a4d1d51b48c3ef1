"""WSC (super_glue/wsc.fixed): does the pronoun refer to the candidate; label 1 -> A (yes)."""

import re

from rexft.tasks.common import YES_NO, continuations, multiple_choice, yes_no

HUB = ("super_glue", "wsc.fixed")
HUB_SPLITS = {"train": "train", "validation": "validation"}
FIELDS = {"text": str, "span1_text": str, "span2_text": str, "label": int}


def to_example(record, check):
    positive = check.label(record["label"], 2) == 1
    question = (f"{record['text']}\nQuestion: In the passage above, does the pronoun "
                f"\"{record['span2_text']}\" refer to \"{record['span1_text']}\"?")
    return multiple_choice(check, question, YES_NO, yes_no(positive))


def _detokenize(text: str) -> str:
    """lm-eval's general_detokenize."""
    for spaced, joined in ((" n't", "n't"), (" )", ")"), ("( ", "("), ('" ', '"'), (' "', '"')):
        text = text.replace(spaced, joined)
    return re.sub(r" (['.,])", r"\1", text)


def to_harness(record, check):
    """lm-eval wsc: the pronoun starred in the passage (span2_index counts words); options [no, yes]."""
    check.fields(record, {"span2_index": int})
    gold = check.label(record["label"], 2)
    text, pronoun, noun = record["text"], record["span2_text"], record["span1_text"]
    before = " ".join(text.split()[: record["span2_index"]])
    after = text[len(before) + len(pronoun) + 1:]
    passage = _detokenize(before + f" *{pronoun}*" + after)
    prompt = (f"Passage: {passage}\nQuestion: In the passage above, does the pronoun \"*{pronoun}*\" refer to "
              f"\"*{noun}*\"?\nAnswer:")
    return continuations(check, prompt, ["no", "yes"], gold)
