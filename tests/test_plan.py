"""`rexft plan`: the memory of a training run from the model config alone, against what real runs measure."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli

# Llama-2-13b-hf's config.json (the commonsense14 recipe's model): a folder with only this file, no weights
LLAMA2_13B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 5120,
              "intermediate_size": 13824, "num_attention_heads": 40, "num_hidden_layers": 40, "num_key_value_heads": 40,
              "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "hidden_act": "silu",
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16"}


@pytest.fixture(scope="module")
def llama2_13b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama2-13b-config")
    (folder / "config.json").write_text(json.dumps(LLAMA2_13B))
    return folder


def plan_of(*overrides):
    from rexft.cli import compose
    from rexft.plan import memory_plan

    cfg, _ = compose(["recipe=commonsense14", *overrides])
    return memory_plan(cfg)


def test_llama2_13b_plan_from_its_config_alone(tmp_path, llama2_13b):
    gpus = [f"model.name_or_path={llama2_13b}", "plan.world_size=8", "plan.device=cuda", "trainer.gradient_checkpointing=true"]
    one = plan_of(*gpus[:1], "plan.device=cuda", "trainer.gradient_checkpointing=true")
    zero3 = plan_of(*gpus, "trainer=zero3")
    result = run_cli("plan", "recipe=commonsense14", f"run_dir={tmp_path}", *gpus, "trainer=fsdp", "model.quantization=nf4")
    assert "memory plan" in result.stdout and "fsdp on 8 x cuda" in result.stdout
    qlora = json.loads((tmp_path / "plan.json").read_text())
    assert one.base_params == zero3.base_params == qlora["base_params"] == 13_015_864_320  # Llama-2-13B's count
    assert one.strategy == "single" and zero3.strategy == "zero3" and qlora["strategy"] == "fsdp"
    assert one.weights == 2 * one.base_params  # bf16 on a GPU
    assert zero3.weights == one.weights // 8 and zero3.gathered > 0
    assert qlora["weights"] < zero3.weights / 3  # 4-bit Linear weights (embeddings and lm_head stay bf16)
    assert zero3.optimizer == one.optimizer // 8 == one.adapter_params  # AdamW's 8 bytes per parameter, / 8
    assert zero3.activations == pytest.approx(one.activations, rel=0.01)  # data parallel: per-device batch
    # without activation checkpointing every block's saved tensors are held: many times more
    assert plan_of(*gpus[:3], "trainer=zero3").activations > 10 * zero3.activations


@pytest.mark.slow
def test_plan_is_within_20_percent_of_the_measured_peak(data_dir):
    """A run of a 256-wide, 2-block LLaMA (batch 4 x 256 tokens) on this CPU: the peak of live tensor bytes
    (torch's profiler) against the plan (scripts/bench_memory.py prints larger cases)."""
    result = subprocess.run([sys.executable, "scripts/bench_memory.py", "--cases", "tiny", "--json"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"plan {row['plan'] / 2 ** 20:.1f} MiB, measured {row['measured'] / 2 ** 20:.1f} MiB: ratio {row['ratio']:.3f}")
    assert 0.8 <= row["ratio"] <= 1.2
