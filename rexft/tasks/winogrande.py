"""WinoGrande (winogrande_xl): which option fills the blank; answer "1"/"2" -> A/B."""

from rexft.tasks.common import continuations, multiple_choice

HUB = ("winogrande", "winogrande_xl")
HUB_SPLITS = {"train": "train", "validation": "validation"}
FIELDS = {"sentence": str, "option1": str, "option2": str, "answer": str}


def to_example(record, check):
    gold = check.label(record["answer"], 2, base=1)
    question = f"{record['sentence']}\nQuestion: Which option fills the blank (_)?"
    return multiple_choice(check, question, [record["option1"], record["option2"]], gold)


def to_harness(record, check):
    """The sentence up to the blank, then each option with the rest of the sentence. lm-eval's winogrande
    scores only the rest, after each filled-in beginning ("partial" scoring: one continuation, two
    contexts), which a prompt-and-options example cannot hold; this is the full-sentence variant."""
    gold = check.label(record["answer"], 2, base=1)
    sentence = record["sentence"]
    if "_" not in sentence:
        check.fail("field 'sentence' has no blank (_)")
    blank = sentence.index("_")
    rest = sentence[blank + 1:]
    return continuations(check, sentence[:blank].rstrip(), [f"{record['option1']}{rest}", f"{record['option2']}{rest}"], gold)
