"""MMLU (cais/mmlu, all): four choices, answer 0..3 -> A..D. Hub training split: auxiliary_train."""

from rexft.tasks.common import multiple_choice

HUB = ("cais/mmlu", "all")
HUB_SPLITS = {"train": "auxiliary_train", "validation": "validation"}
FIELDS = {"question": str, "choices": list, "answer": int}


def to_example(record, check):
    gold = check.label(record["answer"], len(record["choices"]))
    subject = (record.get("subject") or "").replace("_", " ")
    header = f"The following is a question about {subject}.\n" if subject else ""
    return multiple_choice(f"{header}Question: {record['question']}", record["choices"], gold)
