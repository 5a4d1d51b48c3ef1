"""MMLU (cais/mmlu, all): four choices, answer 0..3 -> A..D. Hub training split: auxiliary_train."""

from rexft.tasks.common import LETTERS, continuations, multiple_choice

HUB = ("cais/mmlu", "all")
HUB_SPLITS = {"train": "auxiliary_train", "validation": "validation"}
FIELDS = {"question": str, "choices": list, "answer": int}


def to_example(record, check):
    gold = check.label(record["answer"], len(record["choices"]))
    subject = (record.get("subject") or "").replace("_", " ")
    header = f"The following is a question about {subject}.\n" if subject else ""
    return multiple_choice(check, f"{header}Question: {record['question']}", record["choices"], gold)


def to_harness(record, check):
    """lm-eval mmlu_<subject> (zero-shot): the subject's description, lettered options, the letter."""
    if len(record["choices"]) != 4:
        check.fail(f"field 'choices' should hold 4 choices, has {len(record['choices'])}")
    gold = check.label(record["answer"], 4)
    check.fields(record, {"subject": str})
    description = f"The following are multiple choice questions (with answers) about {record['subject'].replace('_', ' ')}.\n\n"
    lettered = "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(record["choices"]))
    return continuations(check, f"{description}{record['question'].strip()}\n{lettered}\nAnswer:", list(LETTERS[:4]), gold)
