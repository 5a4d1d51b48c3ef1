"""COPA (super_glue/copa): choose the cause or effect of the premise; label indexes choice1/choice2."""

from rexft.tasks.common import continuations, multiple_choice

HUB = ("super_glue", "copa")
HUB_SPLITS = {"train": "train", "validation": "validation"}
FIELDS = {"premise": str, "choice1": str, "choice2": str, "question": str, "label": int}


def to_example(record, check):
    gold = check.label(record["label"], 2)
    question = f"Premise: {record['premise']}\nQuestion: What was the {record['question']}?"
    return multiple_choice(check, question, [record["choice1"], record["choice2"]], gold)


def to_harness(record, check):
    """lm-eval copa: the premise without its full stop, then "because" / "therefore" and the choice,
    lower-cased. lm-eval's choices start with a space and its target delimiter adds another: kept."""
    gold = check.label(record["label"], 2)
    if record["question"] not in ("cause", "effect"):
        check.fail(f"field 'question' should be cause or effect, got {record['question']!r}")
    connector = {"cause": "because", "effect": "therefore"}[record["question"]]
    choices = [" " + choice[:1].lower() + choice[1:] for choice in (record["choice1"], record["choice2"])]
    return continuations(check, record["premise"].strip()[:-1] + f" {connector}", choices, gold)
