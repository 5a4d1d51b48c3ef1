"""The whole pipeline through the real CLI on the smoke recipe: every artifact written and reloadable.

One run directory is built once (``run_dir``) and only read by the tests; a test that writes into a run
(another export mode, a changed adapter) works on its own copy (``run_copy``), so any order of the tests
passes.
"""

import json
import shutil

import pytest
import torch

import rexft
from conftest import DATA, run_cli, tiny_model
from rexft.tasks import task_names


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp("smoke")
    common = ["recipe=smoke", f"run_dir={run_dir}", f"data.local_dir={data_dir}"]
    for command in ("data", "cluster-prior", "train", "eval", "merge-export"):
        run_cli(command, *common)
    return run_dir


@pytest.fixture
def run_copy(run_dir, tmp_path):
    """A copy of the pipeline's run directory that a test may change."""
    return shutil.copytree(run_dir, tmp_path / "run")


def test_data_stage_writes_examples_and_stats(run_dir):
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    assert len(stats["tasks"]) == 14 and stats["train_examples"] == sum(t["train"] for t in stats["tasks"].values())
    assert 14 * 16 * 0.9 <= stats["train_examples"] <= 14 * 16  # a few byte-long hellaswag items are dropped, not cut
    assert all(t["kind"] == "choice" and t["dropped"] <= 24 for t in stats["tasks"].values())
    first = json.loads((run_dir / "data" / "train.jsonl").read_text().splitlines()[0])
    assert {"task", "row", "prompt", "options", "gold"} <= set(first) and isinstance(first["gold"], int)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "config.data.yaml").is_file()


def test_prior_stage_writes_centroids_and_report(run_dir):
    meta = json.loads((run_dir / "prior" / "meta.json").read_text())
    assert meta["k"] == 8 and meta["dim"] == 384 and meta["embedder"] == "all-MiniLM-L6-v2"
    report = json.loads((run_dir / "prior" / "report.json").read_text())
    assert 0 < report["nmi"] <= 1 and 0 < report["purity"] <= 1
    assert (run_dir / "prior" / "report.png").stat().st_size > 1000


def test_training_loss_drops(run_dir):
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert any("routing" in json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())


def test_adapter_reloads_onto_the_base(run_dir):
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["adapter"]["type"] == "trex" and config["prior"]["k"] == 8
    model = rexft.load_adapter(tiny_model(), run_dir / "adapter")
    rexft.set_prior(model, torch.rand(1, 8))
    assert model(input_ids=torch.tensor([[1, 50, 60]])).logits.isfinite().all()
    assert (run_dir / "adapter" / "config.yaml").is_file() and (run_dir / "adapter" / "prior_centroids.safetensors").is_file()


def test_eval_results_have_the_promised_keys(run_dir):
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(results["tasks"]) == set(task_names())
    for entry in results["tasks"].values():
        assert entry["n"] + entry["dropped"] == 8 and entry["n"] >= 4 and entry["kind"] == "choice"
        assert 0 <= entry["accuracy"] <= 1 and entry["ci95"][0] <= entry["accuracy"] <= entry["ci95"][1]
    assert results["mean_accuracy"] == pytest.approx(sum(t["accuracy"] for t in results["tasks"].values()) / 14, abs=1e-3)
    assert results["prompt_style"] == "chat" and ", prompt style chat\n" in (run_dir / "eval" / "results.md").read_text()
    predictions = (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 14 * 8
    assert (run_dir / "eval" / "routing.png").stat().st_size > 1000


def test_export_per_task_loads_in_peft_and_refuses_to_overwrite(run_dir):
    from peft import PeftModel

    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["mode"] == "per_task" and len(manifest["per_task"]) == 14
    assert (run_dir / "export" / "per_task" / "fidelity.md").is_file()
    predictions = [json.loads(l) for l in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    scored = [p for p in predictions if not p.get("dropped")]  # those `rexft data` found too long are never scored
    assert manifest["fidelity_dynamic_from_eval"] == len(scored) > 14 * 6  # rexft eval scored these with this adapter already
    model = PeftModel.from_pretrained(tiny_model(), str(run_dir / "export" / "per_task" / "boolq"))
    assert model(input_ids=torch.tensor([[1, 50, 60]])).logits.isfinite().all()
    again = run_cli("merge-export", "recipe=smoke", f"run_dir={run_dir}", f"data.local_dir={DATA}", check=False)
    assert again.returncode == 2 and "export.overwrite=true" in again.stderr
    assert (run_dir / "export" / "manifest.json").is_file()  # nothing lost


def test_eval_predictions_are_reused_only_for_the_same_adapter_and_settings(run_copy, data_dir):
    from rexft.cli import compose
    from rexft.eval.stage import reusable_predictions

    common = ["recipe=smoke", f"run_dir={run_copy}", f"data.local_dir={data_dir}"]
    assert len(reusable_predictions(compose(common)[0])) == 14 * 8
    assert reusable_predictions(compose(common + ["eval.protocol=loglik"])[0]) == {}
    weights = run_copy / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + bytes(4))  # the adapter changed since rexft eval
    assert reusable_predictions(compose(common)[0]) == {}


def test_eval_compare_prints_a_table_and_a_chart(run_dir, tmp_path):
    out = run_cli("eval", "compare", str(run_dir), str(run_dir), cwd=tmp_path).stdout
    assert "| boolq |" in out and "| **mean accuracy** |" in out
    assert (run_dir / "compare.png").stat().st_size > 1000  # beside the runs, not in the working directory
    assert not (tmp_path / "compare.png").exists()


@pytest.mark.slow
def test_two_process_eval_equals_one_process(run_copy):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "rexft", "eval",
                    "recipe=smoke", f"run_dir={run_copy}", f"data.local_dir={DATA}", "eval.output=eval_2proc"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    one = json.loads((run_copy / "eval" / "results.json").read_text())
    two = json.loads((run_copy / "eval_2proc" / "results.json").read_text())
    assert {t: r["accuracy"] for t, r in two["tasks"].items()} == {t: r["accuracy"] for t, r in one["tasks"].items()}
    assert two["mean_nll"] == pytest.approx(one["mean_nll"], abs=1e-3)
    assert len((run_copy / "eval_2proc" / "predictions.jsonl").read_text().splitlines()) == 14 * 8


def test_export_per_cluster_and_dtype(run_copy):
    run_cli("merge-export", "recipe=smoke", f"run_dir={run_copy}", f"data.local_dir={DATA}", "export.mode=per_cluster",
            "export.dtype=bfloat16", "export.overwrite=true", "export.fidelity=false", "export.merged_models=true")
    manifest = json.loads((run_copy / "export" / "manifest.json").read_text())
    assert manifest["mode"] == "per_cluster" and manifest["dtype"] == "bfloat16"
    clusters = sorted((run_copy / "export" / "per_cluster").iterdir())
    assert clusters and 0 < sum(manifest["per_cluster"].values()) <= 14 * 16  # up to export.route_examples each
    from safetensors.torch import load_file

    tensors = load_file(str(clusters[0] / "adapter_model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    from transformers import AutoModelForCausalLM  # a merged full model per cluster, loadable without rexft

    merged = AutoModelForCausalLM.from_pretrained(run_copy / "export" / "merged" / clusters[0].name)
    assert merged.dtype == torch.bfloat16 and not any("rex_" in n for n, _ in merged.named_parameters())


def test_export_dynamic_adapter_with_loader_notes(run_copy):
    run_cli("merge-export", "recipe=smoke", f"run_dir={run_copy}", f"data.local_dir={DATA}", "export.mode=adapter",
            "export.overwrite=true")
    exported = run_copy / "export" / "adapter"
    assert (exported / "LOADING.md").is_file() and (exported / "prior_centroids.safetensors").is_file()
    model = rexft.load_adapter(tiny_model(), exported)
    reference = rexft.load_adapter(tiny_model(), run_copy / "adapter")
    prior = torch.rand(1, 8)
    ids = torch.tensor([[1, 50, 60]])
    rexft.set_prior(model, prior)
    rexft.set_prior(reference, prior)
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("ci", [False, True], ids=["here", "ci"])
def test_missing_data_is_a_skip_here_and_a_failure_in_ci(tmp_path, ci):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "REXFT_DATA": str(tmp_path / "no-data")}
    env.pop("CI", None)
    env |= {"CI": "true"} if ci else {}
    test = "tests/test_pipeline.py::test_data_stage_writes_examples_and_stats"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert "real data not found" in out.stdout
    assert out.returncode == (1 if ci else 0), out.stdout[-2000:]
