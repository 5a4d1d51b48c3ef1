"""Sequence packing keeps examples apart: a packed row computes what each example computes alone."""

import torch

import rexft
from conftest import randomize_adapters, tiny_model
from rexft.config import AdapterConfig, DataConfig, ModelConfig
from rexft.data import PromptFormat, build_splits, collate_packed, encode_example, pack_rows
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
    (packed,) = pack_rows(rows, 1024)
    batch = collate_packed([packed], tok.pad_token_id)
    rexft.set_prior(model, batch["prior"])
    together = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    # pack_rows orders by length; recover each example's segment from the position restarts
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    for start in starts:
        n = next(len(r["input_ids"]) for r in rows if r["input_ids"] == batch["input_ids"][0, start:start + len(r["input_ids"])].tolist())
        row = next(r for r in rows if r["input_ids"] == batch["input_ids"][0, start:start + n].tolist())
        rexft.set_prior(model, row["prior"][None])
        alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
        torch.testing.assert_close(together[start:start + n], alone, rtol=1e-4, atol=1e-4)
