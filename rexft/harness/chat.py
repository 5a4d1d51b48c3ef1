"""lm-eval ``process_docs`` for the chat-style task definitions (tasks/rexft_chat.yaml): each record laid
out by rexft's own task loader (``to_example``: the question and lettered options of ``data.prompt_style=chat``),
so lm-eval scores exactly the prompts and options ``rexft eval`` scores. One function per built-in task,
named after it (``rexft.harness.chat.boolq``)."""

from __future__ import annotations

from functools import partial

from rexft.tasks import get_task, task_names
from rexft.tasks.common import Checker, converter


def chat_docs(dataset, task: str):
    """Add ``rexft_prompt`` (the user turn), ``rexft_options`` (the option texts, scored after the chat
    template's assistant header) and ``rexft_gold`` (the gold option's index) to every record."""
    module = get_task(task)

    def layout(record: dict, row: int) -> dict:
        check = Checker(task, "lm-eval dataset", row)
        example = converter(module, "chat")(record, check)
        return {"rexft_prompt": example.prompt, "rexft_options": example.options, "rexft_gold": example.gold}

    return dataset.map(layout, with_indices=True)


globals().update({task: partial(chat_docs, task=task) for task in task_names()})
