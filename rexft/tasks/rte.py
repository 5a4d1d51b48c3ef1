"""RTE (super_glue/rte): label 0 = entailment -> A (yes), 1 = not_entailment -> B (no)."""

from rexft.tasks.common import YES_NO, continuations, multiple_choice, yes_no

HUB = ("super_glue", "rte")
HUB_SPLITS = {"train": "train", "validation": "validation"}
FIELDS = {"premise": str, "hypothesis": str, "label": int}


def to_example(record, check):
    entailed = check.label(record["label"], 2) == 0
    question = f"Question: Does this imply that \"{record['hypothesis']}\"?"
    return multiple_choice(check, question, YES_NO, yes_no(entailed), context=record["premise"])


def to_harness(record, check):
    """lm-eval sglue_rte: True = entailment (label 0), False = not entailment."""
    gold = check.label(record["label"], 2)
    text = f"{record['premise']}\nQuestion: {record['hypothesis']} True or False?\nAnswer:"
    return continuations(check, text, ["True", "False"], gold, context_chars=len(record["premise"]) + 1)
