"""Training through the real CLI: resume equals uninterrupted, SIGKILL, NaN, and 2-process runs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, ROOT, run_cli


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def prior(tmp_path_factory, data_dir):
    """One cluster prior for the smoke recipe, copied into each run directory."""
    run_dir = tmp_path_factory.mktemp("prior")
    run_cli("cluster-prior", "recipe=smoke", f"run_dir={run_dir}", f"data.local_dir={data_dir}")
    return run_dir / "prior"


def smoke_run(tmp_path, prior, name, *overrides, launcher=None, check=True):
    run_dir = tmp_path / name
    run_dir.mkdir(exist_ok=True)
    if not (run_dir / "prior").exists():
        shutil.copytree(prior, run_dir / "prior")
        shutil.copytree(prior.parent / "data", run_dir / "data")  # the split the prior was clustered from
    args = ["train", "recipe=smoke", f"run_dir={run_dir}", f"data.local_dir={DATA}", *overrides]
    if launcher is None:
        return run_dir, run_cli(*args, check=check)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, "-m", "rexft", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir, result


def test_resume_continues_exactly(tmp_path, prior):
    """Dropout on, so the RNG state must be restored too."""
    common = ["trainer.max_steps=8", "trainer.save_every=2", "adapter.dropout=0.1"]
    full, _ = smoke_run(tmp_path, prior, "full", *common)
    part, _ = smoke_run(tmp_path, prior, "part", *common, "trainer.stop_after_steps=5")
    assert len(losses(part)) == 5 and not (part / "adapter").exists()
    assert [p.name for p in sorted((part / "checkpoints").iterdir())] == ["step-2", "step-4"]  # keep_last=2
    smoke_run(tmp_path, prior, "part", *common, "trainer.resume=true")
    assert losses(part) == pytest.approx(losses(full), abs=1e-6)
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_sigkill_leaves_the_last_checkpoint_loadable(tmp_path, prior):
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    shutil.copytree(prior, run_dir / "prior")
    process = subprocess.Popen([sys.executable, "-m", "rexft", "train", "recipe=smoke", f"run_dir={run_dir}",
                                f"data.local_dir={DATA}", "trainer.max_steps=100000", "trainer.epochs=1000",
                                "trainer.save_every=1"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((run_dir / "checkpoints").glob("step-*"))) < 2 and process.poll() is None:
        time.sleep(0.2)
    time.sleep(0.37)  # land somewhere inside a later step or checkpoint write
    exited = process.poll()
    process.send_signal(signal.SIGKILL)
    process.wait()
    from rexft.train import checkpoint_dirs

    found = checkpoint_dirs(run_dir)
    assert found, (f"no checkpoint appeared in {run_dir / 'checkpoints'} within 120 s (the training process "
                   + (f"exited on its own with status {exited})" if exited is not None else "was still running)")
                   + ": there is nothing to resume from")
    last = found[-1]
    assert load_file(str(last / "adapter.safetensors"))
    step = json.loads((last / "trainer_state.json").read_text())["step"]
    assert step >= 1
    _, result = smoke_run(tmp_path, prior, "killed", "trainer.max_steps=100000", "trainer.epochs=1000", "trainer.save_every=1",
                          "trainer.resume=true", f"trainer.stop_after_steps={step + 1}")
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step + 1


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, prior):
    run_dir, result = smoke_run(tmp_path, prior, "nan", "trainer.lr=1e30", "trainer.max_grad_norm=0", "trainer.warmup_steps=0",
                                "trainer.save_every=1", "trainer.max_steps=20", check=False)
    assert result.returncode == 2
    assert "non-finite loss" in result.stderr and "Last good checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run_dir / "adapter").exists()
    assert list((run_dir / "checkpoints").glob("step-*"))


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
# Accelerate's own launcher; on a CPU-only machine --multi_gpu is what starts N gloo processes (--cpu runs one)
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.mark.slow
@pytest.mark.parametrize("trainer,launcher", [("default", TORCHRUN), ("default", ACCELERATE), ("zero2", TORCHRUN),
                                              ("zero3", TORCHRUN)], ids=["ddp-torchrun", "ddp-accelerate", "zero2", "zero3"])
def test_two_processes_match_one_process_of_the_same_global_batch(tmp_path, prior, trainer, launcher):
    """DDP over gloo and DeepSpeed ZeRO-2/3 (gloo) on CPU: same data order, same adapter."""
    common = ["trainer.max_steps=4", "adapter.dropout=0", "trainer.mixed_precision=no"]  # float32 on every machine
    single, _ = smoke_run(tmp_path, prior, "single", *common, "trainer.batch_size=8")
    double, _ = smoke_run(tmp_path, prior, f"two-{trainer}", *common, "trainer.batch_size=4", f"trainer={trainer}",
                          launcher=launcher)
    assert losses(double) == pytest.approx(losses(single), abs=1e-5)
    a = load_file(str(single / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(double / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape  # ZeRO-3 shapes are gathered, not empty partitions
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    if trainer != "default":
        assert (double / "checkpoints" / "step-4" / "deepspeed").is_dir()
    if trainer == "zero3":  # an adapter trained under ZeRO-3 exports like any other
        run_cli("merge-export", "recipe=smoke", f"run_dir={double}", f"data.local_dir={DATA}", "export.fidelity=false")
        assert len(json.loads((double / "export" / "manifest.json").read_text())["per_task"]) == 14


def test_packed_training_runs_and_learns(tmp_path, prior):
    run_dir, _ = smoke_run(tmp_path, prior, "packed", "data.packing=true", "trainer.batch_size=2", "trainer.epochs=3")
    curve = losses(run_dir)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_tensorboard_and_offline_wandb_logging(tmp_path, prior, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir, _ = smoke_run(tmp_path, prior, "logged", "trainer.max_steps=3", "trainer.report_to=[tensorboard,wandb]")
    assert list(run_dir.rglob("events.out.tfevents.*"))
    assert list((run_dir / "wandb").glob("offline-run-*"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= set(records[0])


def test_out_of_memory_names_the_keys_that_reduce_memory(tmp_path, prior, monkeypatch):
    """Simulated (no GPU here): a CUDA OOM inside the step becomes one line naming the config keys."""
    import rexft.train as train_module
    from rexft.cli import compose
    from rexft.errors import RexftError

    real_load = train_module.load_model

    def load_then_explode(*args, **kwargs):
        model = real_load(*args, **kwargs)

        def oom(*a, **k):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

        model.forward = oom
        return model

    monkeypatch.setattr(train_module, "load_model", load_then_explode)
    run_dir = tmp_path / "oom"
    shutil.copytree(prior, run_dir / "prior")
    shutil.copytree(prior.parent / "data", run_dir / "data")
    cfg, _ = compose(["recipe=smoke", f"run_dir={run_dir}", f"data.local_dir={DATA}"])
    with pytest.raises(RexftError, match=r"out of GPU memory at step 1; reduce memory with trainer.batch_size .*gradient_checkpointing"):
        train_module.train(cfg)


def test_balance_loss_trains_a_mixture(tmp_path, prior):
    run_dir, _ = smoke_run(tmp_path, prior, "balanced", "adapter=molora", "adapter.aux_loss_weight=0.1", "prior=none",
                           "trainer.max_steps=10", "trainer.routing_stats_every=5")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in records) and len(records) == 10
    stats = records[4]["routing"]
    assert len(stats) == 14 and all(0 < s["entropy"] <= 1 for s in stats.values())


def test_bf16_mixed_precision_trains(tmp_path, prior):
    """bf16 autocast (on CPU here; the same Accelerate path as on a GPU); adapters stay float32."""
    run_dir, _ = smoke_run(tmp_path, prior, "bf16", "trainer.mixed_precision=bf16", "trainer.max_steps=12")
    curve = losses(run_dir)
    assert all(l == l for l in curve) and sum(curve[-3:]) < sum(curve[:3])
    tensors = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in tensors.values())


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_bitsandbytes_8bit_optimizers(tmp_path, prior, optimizer):
    run_dir, _ = smoke_run(tmp_path, prior, optimizer, f"trainer.optimizer={optimizer}", "trainer.max_steps=12")
    curve = losses(run_dir)
    assert all(l == l for l in curve) and sum(curve[-3:]) < sum(curve[:3])


def test_why_checkpoints_are_not_accelerate_save_state(tmp_path):
    """accelerate's save_state (outside DeepSpeed, whose path rexft uses with exclude_frozen_parameters) writes
    the whole model, frozen base included, at every save: 140 GB a checkpoint for a 70B base. rexft's
    checkpoints hold the adapter and its optimizer state only (and load on any world size)."""
    from accelerate import Accelerator

    import rexft
    from conftest import tiny_model
    from rexft.adapters import is_adapter_param

    model = rexft.inject_adapters(tiny_model(), {"type": "lora", "r": 4})
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
    accelerator.save_state(str(tmp_path / "state"))
    saved = load_file(str(tmp_path / "state" / "model.safetensors"))
    frozen = [n for n in saved if not is_adapter_param(n)]
    assert frozen and sum(saved[n].numel() for n in frozen) > 10 * sum(v.numel() for n, v in saved.items() if is_adapter_param(n))
