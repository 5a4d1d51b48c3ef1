"""WinoGrande (winogrande_xl): which option fills the blank; answer "1"/"2" -> A/B."""

from rexft.tasks.common import multiple_choice

HUB = ("winogrande", "winogrande_xl")
HUB_SPLITS = {"train": "train", "validation": "validation"}
FIELDS = {"sentence": str, "option1": str, "option2": str, "answer": str}


def to_example(record, check):
    gold = check.label(record["answer"], 2, base=1)
    question = f"{record['sentence']}\nQuestion: Which option fills the blank (_)?"
    return multiple_choice(question, [record["option1"], record["option2"]], gold)
