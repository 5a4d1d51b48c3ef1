"""Eval scoring: batched == unbatched, hand-checkable logits, letter positions for every task."""

import math
from types import SimpleNamespace

import pytest
import torch

import rexft
from conftest import randomize_adapters, tiny_model
from rexft.config import AdapterConfig, DataConfig, ModelConfig
from rexft.data import PromptFormat, letter_token_ids
from rexft.splits import build_splits
from rexft.evaluate import Scorer, summarize, wilson
from rexft.modeling import byte_tokenizer
from rexft.tasks import task_names

TOK = byte_tokenizer()
FMT = PromptFormat.for_model(TOK, ModelConfig(use_chat_template=False))


@pytest.fixture(scope="module")
def examples(data_dir):
    splits = build_splits(DataConfig(tasks=task_names(), local_dir=str(data_dir), eval_per_task=3))
    return [e for s in splits for e in s.eval]


def trained_like_model():
    return randomize_adapters(rexft.inject_adapters(tiny_model(), AdapterConfig(type="trex", prior_dim=8, dropout=0)), seed=0)


@pytest.mark.parametrize("protocol", ["first_token", "loglik"])
def test_batched_scores_equal_unbatched(examples, protocol):
    model = trained_like_model()
    priors = torch.rand(len(examples), 8)
    batched = Scorer(model, TOK, FMT, 768, batch_size=16, priors=priors, progress=False)
    single = Scorer(model, TOK, FMT, 768, batch_size=1, priors=priors, progress=False)
    a = getattr(batched, protocol)(examples)
    b = getattr(single, protocol)(examples)
    for x, y in zip(a, b):
        assert (x["task"], x["id"]) == (y["task"], y["id"])
        assert x.get("dropped") == y.get("dropped")  # too long for max_length: dropped alike, never cut
        if x.get("dropped"):
            continue
        assert x["scores"] == pytest.approx(y["scores"], rel=1e-6, abs=2e-4)  # loglik sums reach ~1e3: float32 relative error


def test_a_tasks_shared_opening_is_computed_once_and_changes_no_score(examples):
    """first_token without a per-row prior (here a prior-free MoDE adapter): the opening a task's prompts
    share runs once per batch, and every score is what the whole prompt gives."""
    model = randomize_adapters(rexft.inject_adapters(tiny_model(), AdapterConfig(type="mode", r=4, num_experts=3, dropout=0)),
                               seed=0).eval()
    tokens = []
    model.model.embed_tokens.register_forward_hook(lambda module, args, out: tokens.append(args[0].numel()))
    runs = {}
    for share, batch_size in ((False, 1), (True, 16), (True, 4)):
        tokens.clear()
        scorer = Scorer(model, TOK, FMT, 768, batch_size=batch_size, progress=False, share_prefixes=share)
        runs[share, batch_size] = scorer.first_token(examples), sum(tokens)
    reference = runs[False, 1][0]
    for rows, _ in runs.values():
        assert [r.get("predicted") for r in rows] == [r.get("predicted") for r in reference]
        for x, y in zip(rows, reference):
            assert x.get("scores") == pytest.approx(y.get("scores"), abs=2e-4)
    prompts = [e.prompt for e in examples]
    assert runs[True, 16][1] < sum(len(TOK(p)["input_ids"]) for p in prompts)  # fewer tokens than whole prompts


class FavouriteToken(torch.nn.Module):
    """A 'model' whose next-token logits are 0 except favourite: 5.0 and runner_up: 1.0 (no KV cache, so scored
    without shared openings)."""

    def __init__(self, favourite, runner_up, vocab=259):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.favourite, self.runner_up, self.vocab = favourite, runner_up, vocab

    def forward(self, input_ids, logits_to_keep=1, **_):
        logits = torch.zeros(*input_ids.shape[:1], logits_to_keep, self.vocab)
        logits[..., self.favourite] = 5.0
        logits[..., self.runner_up] = 1.0
        return SimpleNamespace(logits=logits)


def test_hand_checkable_first_token_scores(examples):
    _, (id_a, id_b) = letter_token_ids(TOK, FMT, 2)
    binary = [e for e in examples if len(e.options) == 2]
    out = Scorer(FavouriteToken(id_b, id_a), TOK, FMT, 2048, progress=False, share_prefixes=False).first_token(binary)
    norm = math.log(math.exp(5) + math.exp(1) + 257)
    for row in out:
        assert row["predicted"] == "B"
        assert row["scores"] == pytest.approx([1 - norm, 5 - norm], abs=1e-4)
    results = summarize(out, sorted({e.task for e in binary}))
    gold_b = [e.answer == "B" for e in binary]
    assert sum(r["accuracy"] * r["n"] for r in results["tasks"].values()) == pytest.approx(sum(gold_b), abs=0.01)


def test_unrestricted_greedy_counts_non_letters_as_wrong(examples):
    out = Scorer(FavouriteToken(ord("z") + 3, 0), TOK, FMT, 2048, progress=False, share_prefixes=False).first_token(examples, restricted=False)
    assert all(row["predicted"] is None for row in out)


@pytest.mark.parametrize("task", task_names())
def test_every_task_scores_each_option_letter(task, data_dir):
    (split,) = build_splits(DataConfig(tasks=[task], local_dir=str(data_dir), eval_per_task=20))
    n = len(split.eval[0].options)
    _, ids = letter_token_ids(TOK, FMT, n)
    hits = 0
    for letter_index, token in enumerate(ids):
        out = Scorer(FavouriteToken(token, 0), TOK, FMT, 4096, progress=False, share_prefixes=False).first_token(split.eval)
        assert not any(row.get("dropped") for row in out)
        assert all(len(row["scores"]) == n for row in out)
        assert all(row["predicted"] == "ABCDE"[letter_index] for row in out)
        hits += sum(row["predicted"] == row["gold"] for row in out)
    assert hits == len(split.eval)  # each example is right under exactly one letter


def test_wilson_interval():
    assert wilson(0, 0) == [0.0, 0.0]
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
