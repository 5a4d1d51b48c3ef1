"""Eval protocols: what is computed from an engine's few calls (``rexft.inference.Engine``), as typed records.

    first_token  choice tasks, the T-REX study's: the next-token distribution after the prompt, argmax over
                 the option letters' tokens (``restricted``) or over the whole vocabulary (a non-letter
                 prediction counts as wrong). Also the gold letter's NLL.
    loglik       choice tasks, lm-evaluation-harness style: sum of log p(option text | prompt) per option;
                 accuracy raw and length-normalised (per byte).
    generate     generative tasks: greedy (or sampled, or beam) generation scored by ROUGE-L and exact match,
                 and the target NLL: mean nats per target token (the target text and EOS) under teacher
                 forcing.

Every protocol takes the examples with their ids (the ids the engine hands the per-row state hook; by
default their positions) and returns one record per example, in order: a ``Dropped`` record for an example
whose prompt cannot fit ``max_length`` without cutting into it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rexft.data import PromptFormat, encode_example, encode_prompt, letter_token_ids
from rexft.inference import Engine, Row, Sampling, new_text
from rexft.metrics import exact_match, rouge_l
from rexft.tasks.common import LETTERS, Example


@dataclass
class Dropped:
    """An example whose prompt cannot fit data.max_length without cutting into it: counted, not scored."""

    task: str
    id: object
    dropped: bool = True


@dataclass
class ChoicePrediction:
    """A choice example's letters: ``scores`` per option (first_token: the letter's log-probability;
    loglik: the option text's summed log-probability), ``nll`` the gold option's (loglik: per byte)."""

    task: str
    id: object
    gold: str
    predicted: str | None
    scores: list[float]
    nll: float
    predicted_norm: str | None = None  # loglik: the argmax of the per-byte scores


@dataclass
class GeneratedPrediction:
    """A generative example's text, its scores against the references, and its target NLL (None when the
    target does not fit beside the prompt)."""

    task: str
    id: object
    prediction: str
    references: list[str]
    rouge_l: float
    exact_match: float
    target_nll: float | None


Prediction = Dropped | ChoicePrediction | GeneratedPrediction


def as_row(record: Prediction) -> dict:
    """The record as a predictions.jsonl row (loglik's ``predicted_norm`` only where it was computed)."""
    row = asdict(record)
    if isinstance(record, ChoicePrediction) and record.predicted_norm is None:
        del row["predicted_norm"]
    return row


def from_row(row: dict) -> Prediction:
    """A predictions.jsonl row as its record."""
    kind = Dropped if row.get("dropped") else GeneratedPrediction if "prediction" in row else ChoicePrediction
    return kind(**row)


@dataclass
class Prompts:
    """How examples become tokens: the tokenizer, the prompt format and the longest sequence allowed."""

    tokenizer: object
    fmt: PromptFormat
    max_length: int

    def text(self, tokens: list[int], stop: list[str]) -> str:
        return new_text(self.tokenizer, tokens, stop).strip()


def first_token(engine: Engine, prompts: Prompts, examples: list[Example], ids: list[int] | None = None,
                restricted: bool = True) -> list[Prediction]:
    ids = list(range(len(examples))) if ids is None else ids
    prefix, letter_ids = letter_token_ids(prompts.tokenizer, prompts.fmt, max(len(e.options) for e in examples))
    by_id = dict(zip(ids, examples))
    rows = []
    for i, e in by_id.items():
        encoded = encode_prompt(e, prompts.tokenizer, prompts.fmt, prompts.max_length, reserve=len(prefix) + 2)[0]
        if encoded is not None:
            rows.append(Row(i, encoded + prefix, e.task))
    records: dict[int, Prediction] = {}
    for batch, logprobs in engine.next_logprobs(rows):  # (b, V)
        for row, i in enumerate(batch):
            example, options = by_id[i], letter_ids[: len(by_id[i].options)]
            scores = logprobs[row, options]
            if restricted:
                predicted = LETTERS[int(scores.argmax())]
            else:
                top = int(logprobs[row].argmax())
                predicted = LETTERS[options.index(top)] if top in options else None
            records[i] = ChoicePrediction(example.task, example.row, example.letter, predicted,
                                          [round(float(s), 5) for s in scores], round(-float(scores[example.gold]), 5))
    return [records.get(i) or Dropped(e.task, e.row) for i, e in zip(ids, examples)]


def loglik(engine: Engine, prompts: Prompts, examples: list[Example], ids: list[int] | None = None) -> list[Prediction]:
    ids = list(range(len(examples))) if ids is None else ids
    pairs = {}  # (example position, option) -> the prompt with the option as its target
    for k, (i, example) in enumerate(zip(ids, examples)):
        options = [prompts.tokenizer(prompts.fmt.answer_text(text), add_special_tokens=False).input_ids for text in example.options]
        context = encode_prompt(example, prompts.tokenizer, prompts.fmt, prompts.max_length, reserve=max(map(len, options)))[0]
        if context is not None:
            pairs.update(((k, j), Row(i, context, example.task, option)) for j, option in enumerate(options))
    sums = engine.score(pairs)
    records: list[Prediction] = []
    for k, example in enumerate(examples):
        if (k, 0) not in sums:
            records.append(Dropped(example.task, example.row))
            continue
        scores = [sums[k, j] for j in range(len(example.options))]
        normed = [s / max(1, len(o.encode())) for s, o in zip(scores, example.options)]
        best = lambda values: LETTERS[max(range(len(values)), key=values.__getitem__)]
        records.append(ChoicePrediction(example.task, example.row, example.letter, best(scores), [round(s, 5) for s in scores],
                                        round(-normed[example.gold], 5), predicted_norm=best(normed)))
    return records


def target_nll(engine: Engine, prompts: Prompts, examples: list[Example], ids: list[int] | None = None) -> list[float | None]:
    """Mean nats per target token (the target text and EOS, as trained) under teacher forcing; None for an
    example that cannot fit max_length."""
    ids = list(range(len(examples))) if ids is None else ids
    pairs = {}
    for k, (i, example) in enumerate(zip(ids, examples)):
        row = encode_example(example, prompts.tokenizer, prompts.fmt, prompts.max_length)
        if row is not None:
            pairs[k] = Row(i, row["input_ids"][: row["prompt_length"]], example.task, row["input_ids"][row["prompt_length"]:])
    sums = engine.score(pairs)
    return [mean_nll(sums[k], len(pairs[k].target)) if k in sums else None for k in range(len(examples))]


def mean_nll(logprob_sum: float | None, tokens: int) -> float | None:
    return None if logprob_sum is None else round(-logprob_sum / tokens, 5)


def generate(engine: Engine, prompts: Prompts, examples: list[Example], settings, ids: list[int] | None = None) -> list[Prediction]:
    """Each example's generation (``settings``: eval's max_new_tokens, stop, do_sample, num_beams...) scored
    by ROUGE-L and exact match against its references, and by its target NLL."""
    ids = list(range(len(examples))) if ids is None else ids
    by_id = dict(zip(ids, examples))
    rows = {}
    for i, example in by_id.items():
        row = encode_example(example, prompts.tokenizer, prompts.fmt, prompts.max_length)
        if row is not None:
            rows[i] = Row(i, row["input_ids"][: row["prompt_length"]], example.task, row["input_ids"][row["prompt_length"]:])
        else:  # the target does not fit beside the prompt: generate anyway, no target NLL
            encoded = encode_prompt(example, prompts.tokenizer, prompts.fmt, prompts.max_length)[0]
            if encoded is not None:
                rows[i] = Row(i, encoded, example.task)
    sampling = Sampling.of(settings)
    records: dict[int, Prediction] = {}
    for out in engine.generate(list(rows.values()), sampling):
        example, text = by_id[out.id], prompts.text(out.tokens[: sampling.max_new_tokens], sampling.stop)
        references = example.references or [example.target]
        records[out.id] = GeneratedPrediction(example.task, example.row, text, references, round(rouge_l(text, references), 5),
                                              exact_match(text, references),
                                              mean_nll(out.target_logprob, len(rows[out.id].target)))
    return [records.get(i) or Dropped(e.task, e.row) for i, e in zip(ids, examples)]


def score_examples(engine: Engine, prompts: Prompts, examples: list[Example], settings) -> list[Prediction]:
    """Each example with its task's protocol (``settings``: EvalConfig); records in the order of
    ``examples``, whose positions are the ids the engine hands its per-row state hook."""
    records: list[Prediction | None] = [None] * len(examples)
    for kind in ("choice", "generate"):
        ids = [i for i, e in enumerate(examples) if e.kind == kind]
        if not ids:
            continue
        subset = [examples[i] for i in ids]
        if kind == "generate":
            scored = generate(engine, prompts, subset, settings, ids)
        elif settings.protocol == "first_token":
            scored = first_token(engine, prompts, subset, ids, settings.restricted)
        else:
            scored = loglik(engine, prompts, subset, ids)
        for i, record in zip(ids, scored):
            records[i] = record
    return records
