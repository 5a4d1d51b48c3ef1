"""QLoRA: adapters train on a bitsandbytes NF4 base (its CPU backend here) and export onto full weights."""

import json

import pytest
import torch

from conftest import run_cli, tiny_model

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rexft.modeling import byte_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def test_nf4_base_is_wrapped_not_copied(model_dir):
    import rexft
    from rexft.config import ModelConfig
    from rexft.modeling import load_model

    model = load_model(ModelConfig(name_or_path=str(model_dir), quantization="nf4", use_chat_template=False))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    rexft.inject_adapters(model, {"type": "trex", "prior_dim": 8, "r1": 2, "r2": 4})
    assert model.model.layers[0].self_attn.q_proj.base is q_proj
    rexft.set_prior(model, torch.rand(1, 8))
    model(input_ids=torch.tensor([[1, 70, 80]])).logits.sum().backward()
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.rex_A.grad is not None and layer.rex_A.dtype == torch.float32


def test_qlora_train_and_export_through_the_cli(model_dir, tmp_path, data_dir):
    common = ["recipe=smoke", f"run_dir={tmp_path}", f"data.local_dir={data_dir}", f"model.name_or_path={model_dir}",
              "model.quantization=nf4"]
    run_cli("cluster-prior", *common)
    run_cli("train", *common, "trainer.max_steps=6")
    losses = [json.loads(l)["loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(l == l for l in losses)
    result = run_cli("merge-export", *common, "export.fidelity=false")
    assert "not the 4-bit weights" in result.stderr  # the precision warning
    assert len(json.loads((tmp_path / "export" / "manifest.json").read_text())["per_task"]) == 14
