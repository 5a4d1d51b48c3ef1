"""Eval scoring: batched == unbatched on both engines, hand-checkable logits, letter positions for every task."""

import math
from types import SimpleNamespace

import pytest
import torch

import rexft
from conftest import randomize_adapters, tiny_model
from rexft.config import AdapterConfig, DataConfig, ModelConfig
from rexft.data import PromptFormat, letter_token_ids
from rexft.inference import make_engine, prior_state
from rexft.eval.protocols import Prompts, first_token, loglik
from rexft.eval.report import summarize
from rexft.metrics import wilson
from rexft.splits import build_splits
from rexft.modeling import byte_tokenizer
from rexft.tasks import task_names

TOK = byte_tokenizer()
FMT = PromptFormat.for_model(TOK, ModelConfig(use_chat_template=False))
PROTOCOLS = {"first_token": first_token, "loglik": loglik}


def score(protocol, model, examples, engine="pool", priors=None, batch_size=16, max_length=768, share_prefixes=True, **kwargs):
    """``protocol``'s records on ``engine`` (plain or pool) for a model whose adapters take ``priors``."""
    engine = make_engine(engine, model, TOK, prior_state(model, priors), batch_size)
    engine.share_prefixes = engine.share_prefixes and share_prefixes
    return PROTOCOLS[protocol](engine, Prompts(TOK, FMT, max_length), examples, **kwargs)


@pytest.fixture(scope="module")
def examples(data_dir):
    splits = build_splits(DataConfig(tasks=task_names(), local_dir=str(data_dir), eval_per_task=3))
    return [e for s in splits for e in s.eval]


def trained_like_model():
    return randomize_adapters(rexft.inject_adapters(tiny_model(), AdapterConfig(type="trex", prior_dim=8, dropout=0)), seed=0)


@pytest.mark.parametrize("engine", ["plain", "pool"])
@pytest.mark.parametrize("protocol", ["first_token", "loglik"])
def test_batched_scores_equal_unbatched(examples, protocol, engine):
    """Batched on either engine == one example at a time on the plain engine (per-row priors)."""
    model = trained_like_model()
    priors = torch.rand(len(examples), 8)
    a = score(protocol, model, examples, engine, priors, batch_size=16)
    b = score(protocol, model, examples, "plain", priors, batch_size=1)
    for x, y in zip(a, b):
        assert (x.task, x.id) == (y.task, y.id)
        assert type(x) is type(y)  # too long for max_length: dropped alike, never cut
        if hasattr(x, "dropped"):
            continue
        assert (x.predicted, x.predicted_norm) == (y.predicted, y.predicted_norm)
        assert x.scores == pytest.approx(y.scores, rel=1e-6, abs=2e-4)  # loglik sums reach ~1e3: float32 relative error


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
        runs[share, batch_size] = score("first_token", model, examples, batch_size=batch_size, share_prefixes=share), sum(tokens)
    reference = runs[False, 1][0]
    for rows, _ in runs.values():
        assert [getattr(r, "predicted", None) for r in rows] == [getattr(r, "predicted", None) for r in reference]
        for x, y in zip(rows, reference):
            assert getattr(x, "scores", None) == pytest.approx(getattr(y, "scores", None), abs=2e-4)
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


@pytest.mark.parametrize("engine", ["plain", "pool"])
def test_hand_checkable_first_token_scores(examples, engine):
    _, (id_a, id_b) = letter_token_ids(TOK, FMT, 2)
    binary = [e for e in examples if len(e.options) == 2]
    out = score("first_token", FavouriteToken(id_b, id_a), binary, engine, max_length=2048, share_prefixes=False)
    norm = math.log(math.exp(5) + math.exp(1) + 257)
    for row in out:
        assert row.predicted == "B"
        assert row.scores == pytest.approx([1 - norm, 5 - norm], abs=1e-4)
    results = summarize(out, sorted({e.task for e in binary}))
    gold_b = [e.gold == 1 for e in binary]
    assert sum(r["accuracy"] * r["n"] for r in results["tasks"].values()) == pytest.approx(sum(gold_b), abs=0.01)


def test_unrestricted_greedy_counts_non_letters_as_wrong(examples):
    out = score("first_token", FavouriteToken(ord("z") + 3, 0), examples, max_length=2048, share_prefixes=False, restricted=False)
    assert all(row.predicted is None for row in out)


@pytest.mark.parametrize("task", task_names())
def test_every_task_scores_each_option_letter(task, data_dir):
    (split,) = build_splits(DataConfig(tasks=[task], local_dir=str(data_dir), eval_per_task=20))
    n = len(split.eval[0].options)
    _, ids = letter_token_ids(TOK, FMT, n)
    hits = 0
    for letter_index, token in enumerate(ids):
        out = score("first_token", FavouriteToken(token, 0), split.eval, "plain", max_length=4096)
        assert not any(hasattr(row, "dropped") for row in out)
        assert all(len(row.scores) == n for row in out)
        assert all(row.predicted == "ABCDE"[letter_index] for row in out)
        hits += sum(row.predicted == row.gold for row in out)
    assert hits == len(split.eval)  # each example is right under exactly one letter


def test_wilson_interval():
    assert wilson(0, 0) == [0.0, 0.0]
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
