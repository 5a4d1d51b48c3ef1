"""Social IQa: label "1".."3" -> A..C over answerA..answerC."""

from rexft.tasks.common import continuations, multiple_choice

HUB = ("allenai/social_i_qa", None)
HUB_SPLITS = {"train": "train", "validation": "validation"}
FIELDS = {"context": str, "question": str, "answerA": str, "answerB": str, "answerC": str, "label": str}


def to_example(record, check):
    gold = check.label(record["label"], 3, base=1)
    options = [record["answerA"], record["answerB"], record["answerC"]]
    return multiple_choice(check, f"Question: {record['question']}", options, gold, context=record["context"])


def to_harness(record, check):
    """lm-eval social_iqa."""
    gold = check.label(record["label"], 3, base=1)
    options = [record["answerA"], record["answerB"], record["answerC"]]
    return continuations(check, f"Q: {record['context']} {record['question']}\nA:", options, gold)
