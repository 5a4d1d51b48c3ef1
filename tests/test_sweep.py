"""Sweeps through the real CLI (``rexft train -m ...``, Hydra's multirun), the tuning split they choose on, the
Optuna sweeper, the SLURM launcher's composition and ``rexft sweep report``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli

# the smoke recipe cut to what a sweep test needs: two tasks, two steps, a tuning split
SMALL = ["recipe=smoke", "data.tasks=[boolq,copa]", "data.train_per_task=8", "data.eval_per_task=4",
         "data.tuning_per_task=3", "trainer.max_steps=2", "prior.k=4"]


def job_dirs(sweep: Path) -> dict[str, Path]:
    return {d.name: d for d in sweep.iterdir() if (d / "sweep-job.json").is_file()}


def steps(job: Path) -> dict:
    return json.loads((job / "sweep-job.json").read_text())["steps"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_dir) -> tuple[Path, str]:
    """A 2x2 sweep (adapter x lr) in which one lr is out of range, so its two jobs fail."""
    sweep = tmp_path_factory.mktemp("sweep") / "grid"
    result = run_cli("train", "-m", *SMALL, "adapter=lora,trex", "trainer.lr=3e-3,-1", f"hydra.sweep.dir={sweep}",
                     check=False)
    return sweep, result.stdout + result.stderr, result.returncode


def test_multirun_gives_each_job_a_run_directory_with_its_config(sweep):
    path, output, code = sweep
    jobs = job_dirs(path)
    assert sorted(jobs) == ["adapter=lora,trainer.lr=-1", "adapter=lora,trainer.lr=0.003",
                            "adapter=trex,trainer.lr=-1", "adapter=trex,trainer.lr=0.003"]
    for name in ("adapter=lora,trainer.lr=0.003", "adapter=trex,trainer.lr=0.003"):
        job = jobs[name]
        assert (job / "adapter" / "adapter_config.json").is_file()
        assert (job / "tuning" / "results.json").is_file()  # sweep.then's default: tune
        config = (job / "config.train.yaml").read_text()
        assert f"run_dir: {job}" in config and "lr: 0.003" in config
        assert steps(job)["train"]["status"] == "ok" and steps(job)["tune"]["status"] == "ok"


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(sweep):
    path, output, code = sweep
    assert code == 1  # the sweep says some jobs failed ...
    failed = job_dirs(path)["adapter=lora,trainer.lr=-1"]
    entry = steps(failed)["train"]
    assert entry["status"] == "failed" and "trainer.lr" in entry["error"] and "out of range" in entry["error"]
    assert "2 of 4 jobs failed" in output
    assert steps(job_dirs(path)["adapter=trex,trainer.lr=0.003"])["train"]["status"] == "ok"  # ... after the rest ran


def test_jobs_with_the_same_data_share_the_data_and_prior_stages(sweep):
    path, _, _ = sweep
    shared = sorted(p.name for p in (path / ".shared").iterdir())
    assert [s.split("-")[0] for s in shared] == ["data", "prior"]  # one data key, one prior key for all four jobs
    jobs = job_dirs(path)
    lora, trex = jobs["adapter=lora,trainer.lr=0.003"], jobs["adapter=trex,trainer.lr=0.003"]
    assert (lora / "data" / "split.json").read_text() == (trex / "data" / "split.json").read_text()
    # only one job ran `rexft data`: the others adopted its data/ (no config.data.yaml of their own)
    assert sum((j / "config.data.yaml").is_file() for j in (lora, trex)) == 1


def test_rerunning_a_sweep_skips_finished_jobs(sweep, tmp_path):
    path, _, _ = sweep
    job = job_dirs(path)["adapter=lora,trainer.lr=0.003"]
    weights = (job / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    # a job killed before its tune step finished: only that step runs again
    record = json.loads((job / "sweep-job.json").read_text())
    del record["steps"]["tune"]
    (job / "sweep-job.json").write_text(json.dumps(record))
    result = run_cli("train", "-m", *SMALL, "adapter=lora,trex", "trainer.lr=3e-3,-1", f"hydra.sweep.dir={path}",
                     check=False)  # the same command line: the same job directories
    log = result.stdout + result.stderr
    assert result.returncode == 1 and "2 of 4 jobs failed" in log  # the failed jobs are tried again
    assert "adapter=lora,trainer.lr=0.003: train already finished with this config, skipped" in log
    assert "adapter=trex,trainer.lr=0.003: tune already finished with this config, skipped" in log
    assert "adapter=lora,trainer.lr=0.003: tune already finished" not in log
    assert (job / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == weights  # not retrained
    assert steps(job)["tune"]["status"] == "ok"


def test_sweep_report_tables_every_job_and_picks_the_best_on_the_tuning_split(sweep):
    path, _, _ = sweep
    result = run_cli("sweep", "report", str(path))
    table = (path / "sweep.md").read_text()
    assert result.stdout.startswith(table.splitlines()[0])
    rows = [line for line in table.splitlines() if line.startswith("| adapter=")]
    assert len(rows) == 4 and sum("(best)" in row for row in rows) == 1
    assert "tuning mean_accuracy" in table and "tokens/s" in table and "trainable" in table
    jobs = {j["name"]: j for j in json.loads((path / "sweep.json").read_text())}
    lora = jobs["adapter=lora,trainer.lr=0.003"]
    results = json.loads((path / "adapter=lora,trainer.lr=0.003" / "tuning" / "results.json").read_text())
    evaluated = path / "adapter=lora,trainer.lr=0.003" / "eval" / "results.json"  # only once `rexft eval -m` ran
    assert lora["tuning"] == results["mean_accuracy"]
    assert lora["eval"] == (json.loads(evaluated.read_text())["mean_accuracy"] if evaluated.is_file() else None)
    assert lora["trainable"] > 0 and lora["tokens_per_s"] > 0
    best = next(row for row in rows if "(best)" in row).split()[1]  # "| NAME **(best)** | ..."
    scored = {n: j["tuning"] for n, j in jobs.items() if j["tuning"] is not None}
    assert max(scored.values()) == scored[best]


def test_every_command_sweeps_over_the_same_job_directories(sweep):
    """`rexft eval -m` with the train sweep's overrides evaluates each trained job where it lies."""
    path, _, _ = sweep
    result = run_cli("eval", "-m", *SMALL, "adapter=lora,trex", "trainer.lr=3e-3,-1", f"hydra.sweep.dir={path}",
                     check=False)
    assert result.returncode == 1  # the out-of-range lr fails again
    for name in ("adapter=lora,trainer.lr=0.003", "adapter=trex,trainer.lr=0.003"):
        job = job_dirs(path)[name]
        results = json.loads((job / "eval" / "results.json").read_text())
        assert results["model"] == f"adapter {job / 'adapter'}" and steps(job)["eval"]["status"] == "ok"


def test_the_tuning_split_is_disjoint_from_training_and_evaluation(sweep):
    """A tuning row is a training-split row that was never trained on, and never a reported evaluation row."""
    path, _, _ = sweep
    job = job_dirs(path)["adapter=lora,trainer.lr=0.003"]
    record = json.loads((job / "data" / "split.json").read_text())
    assert record["data"]["tuning_per_task"] == 3
    rows = lambda name: {(r["task"], r["row"]) for r in map(json.loads, (job / "data" / name).read_text().splitlines())}
    tuning, train = rows("tuning.jsonl"), rows("train.jsonl")
    assert len(tuning) == 6 and not tuning & train
    for task, entry in record["tasks"].items():
        assert len(entry["tuning_rows"]) == 3 and not set(entry["tuning_rows"]) & set(entry["train_rows"])
        if entry["train_source"].startswith("train rows"):  # evaluation rows held out of the same file
            assert not set(entry["tuning_rows"]) & set(entry["eval_rows"])
    tuned = json.loads((job / "tuning" / "results.json").read_text())
    assert {t: e["n"] for t, e in tuned["tasks"].items()} == {"boolq": 3, "copa": 3}
    assert set(tuned["eval_source"].values()) == {"tuning rows held out from training"}


def test_eval_on_the_tuning_split_without_one_is_one_clear_error(tmp_path, data_dir):
    result = run_cli("eval", *SMALL[:-2], "data.tuning_per_task=0", f"run_dir={tmp_path}", "eval.split=tuning",
                     "eval.use_adapter=false", check=False)
    assert result.returncode == 2 and "no prepared data" in result.stderr  # nothing prepared yet: says what to run
    run_cli("data", *SMALL[:-2], "data.tuning_per_task=0", f"run_dir={tmp_path}")
    result = run_cli("eval", *SMALL[:-2], "data.tuning_per_task=0", f"run_dir={tmp_path}", "eval.split=tuning",
                     "eval.use_adapter=false", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("rexft: error: eval.split=tuning")
    assert "data.tuning_per_task" in result.stderr


def test_a_bad_swept_value_fails_before_any_job(tmp_path):
    result = run_cli("train", "-m", "recipe=smoke", "adapter=lora,loar", f"hydra.sweep.dir={tmp_path / 's'}",
                     check=False)
    assert result.returncode == 2 and "unknown adapter 'loar'" in result.stderr
    assert not (tmp_path / "s").exists()
    result = run_cli("train", "-m", "recipe=smoke", "trainer.lrr=1e-3,1e-4", check=False)
    assert result.returncode == 2 and "unknown config key 'trainer.lrr'" in result.stderr
    result = run_cli("train", "-m", "recipe=smoke", "run_dir=x", "trainer.lr=1e-3,1e-4", check=False)
    assert result.returncode == 2 and "hydra.sweep.dir" in result.stderr


def test_optuna_sweeper_runs_trials_on_the_tuning_metric(tmp_path, data_dir):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    result = run_cli("train", "-m", *SMALL, "adapter=lora", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
                     "hydra.sweeper.sampler.seed=0", "sweep.metric=mean_nll", "trainer.lr=tag(log, interval(1e-4, 1e-2))",
                     f"hydra.sweep.dir={sweep}")
    jobs = job_dirs(sweep)
    assert len(jobs) == 2 and all(steps(j)["tune"]["status"] == "ok" for j in jobs.values())
    optimization = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    nll = {json.loads((j / "tuning" / "results.json").read_text())["mean_nll"] for j in jobs.values()}
    assert optimization["best_value"] == min(nll)  # minimized: the direction follows sweep.metric
    assert "tuning mean_nll" in result.stdout


def test_submitit_slurm_launcher_composes_with_rexfts_config():
    """No SLURM here: the launcher's config is composed with rexft's, as `rexft train -m hydra/launcher=submitit_slurm`
    composes it, and its settings land where submitit reads them."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from rexft.cli import store_schema
    from rexft.config import config_root

    store_schema()
    with initialize_config_dir(config_dir=str(config_root() / "configs"), version_base=None):
        composed = compose("rexft", overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                                               "hydra.launcher.gpus_per_node=8", "hydra.launcher.timeout_min=720",
                                               "adapter=lora"], return_hydra_config=True)
    launcher = composed.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 8, 720)
    assert composed.adapter.type == "lora"


def test_a_killed_job_resumes_from_its_checkpoint(tmp_path, data_dir):
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    sweep = tmp_path / "killed"
    args = ["train", "-m", *[a for a in SMALL if not a.startswith("trainer.max_steps")], "trainer.max_steps=12",
            "trainer.save_every=2", "adapter=lora", f"hydra.sweep.dir={sweep}"]
    process = subprocess.Popen([sys.executable, "-m", "rexft", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    job = sweep / "job"  # nothing swept: one job
    deadline = time.time() + 300
    while time.time() < deadline and len(list((job / "checkpoints").glob("step-*"))) < 1:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list((job / "checkpoints").glob("step-*")), "no checkpoint appeared within 300 s: nothing to resume from"
    assert steps(job)["train"]["status"] == "running"  # killed mid-step: the record says so
    result = run_cli(*args)
    assert "job: training was interrupted; resuming from" in result.stdout + result.stderr
    assert [json.loads(line)["step"] for line in (job / "metrics.jsonl").read_text().splitlines()] == list(range(1, 13))
    assert steps(job)["train"]["status"] == "ok" and steps(job)["tune"]["status"] == "ok"
