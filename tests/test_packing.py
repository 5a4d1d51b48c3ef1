"""Sequence packing keeps examples apart: a packed row computes what each example computes alone."""

import torch

import rexft
from conftest import assert_packed_equals_alone, randomize_adapters, tiny_model
from rexft.config import AdapterConfig, DataConfig, ModelConfig
from rexft.data import PromptFormat, encode_example, pack_rows
from rexft.splits import build_splits
from rexft.modeling import byte_tokenizer


def test_pack_rows_fills_rows_without_splitting_examples():
    rows = [{"input_ids": [1] * n, "labels": [-100] * (n - 1) + [5]} for n in (60, 50, 40, 30, 20, 10)]
    packed = pack_rows(rows, 100)
    assert sorted(len(r["input_ids"]) for r in packed) == [10, 100, 100]  # first fit, longest first
    assert sum(r["packed"] for r in packed) == 6
    assert all(r["position_ids"].count(0) == r["packed"] for r in packed)


@torch.no_grad()
def test_packed_logits_equal_examples_run_alone(data_dir):
    tok = byte_tokenizer()
    fmt = PromptFormat.for_model(tok, ModelConfig(use_chat_template=False))
    (split,) = build_splits(DataConfig(tasks=["copa"], local_dir=str(data_dir), eval_per_task=3))
    rows = [encode_example(e, tok, fmt, 256) for e in split.eval]
    priors = torch.rand(3, 8)
    for row, prior in zip(rows, priors):
        row["prior"] = prior
    model = randomize_adapters(rexft.inject_adapters(tiny_model(), AdapterConfig(type="trex", prior_dim=8, dropout=0)))
    assert_packed_equals_alone(model, rows, tok.pad_token_id)
