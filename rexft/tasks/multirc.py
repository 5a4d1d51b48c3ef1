"""MultiRC (super_glue/multirc): is the candidate answer correct; label 1 -> A (yes)."""

from rexft.tasks.common import YES_NO, continuations, multiple_choice, yes_no

HUB = ("super_glue", "multirc")
HUB_SPLITS = {"train": "train", "validation": "validation"}
FIELDS = {"paragraph": str, "question": str, "answer": str, "label": int}


def to_example(record, check):
    positive = check.label(record["label"], 2) == 1
    question = (f"Question: {record['question']}\nCandidate answer: {record['answer']}\n"
                "Is the candidate answer correct?")
    return multiple_choice(check, question, YES_NO, yes_no(positive), context=record["paragraph"])


def to_harness(record, check):
    """lm-eval multirc (v2.0), as it is: options [answer + "Is the answer correct? yes", ... "no"] and
    doc_to_target = label, so a correct answer (label 1) has "... no" as its gold continuation."""
    gold = check.label(record["label"], 2)
    text = f"{record['paragraph']}\nQuestion: {record['question']}\nAnswer:"
    choices = [f"{record['answer']}\nIs the answer correct? {word}" for word in ("yes", "no")]
    return continuations(check, text, choices, gold, context_chars=len(record["paragraph"]) + 1)
