"""CommonsenseQA: five choices; answerKey is the gold choice's label."""

from rexft.tasks.common import LETTERS, continuations, keyed_choices, multiple_choice

HUB = ("tau/commonsense_qa", None)
HUB_SPLITS = {"train": "train", "validation": "validation"}
FIELDS = {"question": str, "choices": dict, "answerKey": str}


def to_example(record, check):
    texts, gold = keyed_choices(record, check)
    return multiple_choice(check, f"Question: {record['question']}", texts, gold)


def to_harness(record, check):
    """lm-eval commonsense_qa: lettered options in the prompt, the letter is the continuation."""
    texts, gold = keyed_choices(record, check)
    lettered = "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(texts))
    return continuations(check, f"Question: {record['question'].strip()}\n{lettered}\nAnswer:", list(LETTERS[: len(texts)]), gold)
