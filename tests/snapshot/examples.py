"""Digests of the examples every loader builds, to show a refactor of the loaders changes none of them.

    python tests/snapshot/examples.py > /tmp/before.json   (on the old code)
    python tests/snapshot/examples.py > /tmp/after.json    (on the new code); then diff the two

Per configuration (a recipe and overrides, composed as the CLI composes them) and per task: the sha256 of every
train and eval example's task, row, prompt, options, gold letter or target, references, messages and context
span, in order; the train_source / eval_from / kind recorded for it; and the digest of the training mixture's
order. Needs REXFT_DATA (the local data folder).
"""

from __future__ import annotations

import hashlib
import json

from rexft.cli import compose
from rexft.splits import mixture, prepared_splits

CONFIGS = {
    "demo": ["recipe=demo"],
    "demo-sni": ["recipe=demo-sni"],
    "demo-harness": ["recipe=demo", "data.prompt_style=harness", "eval.protocol=loglik"],
    # every row of all 14 built-in tasks, in both prompt styles
    "all-chat": ["recipe=demo", "data.train_per_task=null", "data.eval_per_task=null"],
    "all-harness": ["recipe=demo", "data.prompt_style=harness", "eval.protocol=loglik",
                    "data.train_per_task=null", "data.eval_per_task=null"],
}


def content(example) -> list:
    """What an example says, whatever its fields are named: the gold letter of a choice example, the target of
    a generative one."""
    if hasattr(example, "answer"):
        answer = example.answer
    else:
        answer = "ABCDEFGHIJ"[example.gold] if example.kind == "choice" else example.target
    return [example.task, example.row, example.prompt, example.options, answer, example.references, example.messages,
            example.context_chars, example.context_start, example.system, example.prompt_style, example.kind]


def digest(rows) -> str:
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def snapshot(overrides: list[str]) -> dict:
    cfg, _ = compose(overrides)
    splits, unseen = prepared_splits(cfg)
    tasks = {}
    for split in splits + unseen:
        kinds = sorted({e.kind for e in split.train + split.eval})
        tasks[split.task] = {"train": digest([content(e) for e in split.train]),
                             "eval": digest([content(e) for e in split.eval]),
                             "n": [len(split.train), len(split.eval)], "kind": kinds,
                             "train_source": split.train_source, "eval_from": split.eval_from, "source": split.source}
    return {"mixture": digest([[e.task, e.row] for e in mixture(splits, cfg.data)]),
            "order": [s.task for s in splits + unseen], "tasks": tasks}


if __name__ == "__main__":
    print(json.dumps({name: snapshot(overrides) for name, overrides in CONFIGS.items()}, indent=1, sort_keys=True))
