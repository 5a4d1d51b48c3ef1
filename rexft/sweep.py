"""Sweeps: ``rexft <command> -m key=a,b ...`` (Hydra's multirun) runs the command once per combination of
values, each job in a run directory of its own under one sweep directory; what each job did is recorded there.

    runs/<name>/sweep-<id>/              one sweep: <id> is the hash of its overrides, so the same command line
                                         finds the same folder again (or hydra.sweep.dir=PATH)
      multirun.yaml                      Hydra's record of the sweep
      .shared/<key>/{data,prior}/        the data and cluster-prior stages, computed once for all the jobs with
                                         the same data (and prior) settings and copied into each job
      <key=value,...>/                   one job, named by its swept values: a run directory (config.yaml,
                                         data/, prior/, adapter/, tuning/, eval/, metrics.jsonl ...)
        .hydra/                          Hydra's composed config and overrides of the job
        sweep-job.json                   per step (the command, then sweep.then's tune / eval): status (running,
                                         ok, failed), the config it ran with (sha256), seconds, the error
      sweep.{md,json,png}                ``rexft sweep report``: every job's parameters, tuning metric, eval
                                         metric, tokens/s and trainable parameters; the metric against the lr

A job's steps are skipped when its record says they finished with the same resolved config, so re-running
a killed sweep does only what is left; a training step that was killed resumes from its newest checkpoint
(trainer.save_every). A step that fails is recorded with its error and the sweep goes on.

The objective a job returns to the sweeper (Optuna's value; the report's "tuning" column) is ``sweep.metric``
on the tuning split (``data.tuning_per_task`` training rows never trained on), never on the rows that get
reported: selection and report stay apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rexft.adapters import ADAPTER_CONFIG
from rexft.config import METRICS, RunConfig
from rexft.errors import RexftError
from rexft.rundir import read_jsonl, write_json

log = logging.getLogger(__name__)

RECORD = "sweep-job.json"
SHARED = ".shared"
TUNING_OUTPUT = "tuning"


# ------------------------------------------------------------------------------------------- the record
def config_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_record(job_dir: Path) -> dict:
    path = Path(job_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else {"steps": {}}


def finished(job_dir: Path, step: str, digest: str) -> bool:
    """The step ran to the end in this job directory with the same resolved config."""
    entry = read_record(job_dir)["steps"].get(step)
    return bool(entry) and entry["status"] == "ok" and entry["config"] == digest


def record_step(job_dir: Path, step: str, status: str, digest: str, seconds: float, overrides: list[str],
                error: str | None = None) -> None:
    record = read_record(job_dir)
    record["overrides"] = overrides
    record["steps"][step] = {"status": status, "config": digest, "seconds": round(seconds, 1),
                             **({"error": error} if error else {})}
    write_json(Path(job_dir) / RECORD, record)


def describe_error(err: BaseException) -> str:
    """One line for rexft's own errors (a user's mistake); the last frames of a traceback otherwise."""
    if isinstance(err, RexftError):  # the CLI's ConfigError is one too
        return str(err)
    return "".join(traceback.format_exception(type(err), err, err.__traceback__)[-3:]).strip()


# -------------------------------------------------------------------------------------- shared stages
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def shared_keys(cfg: RunConfig) -> dict[str, str]:
    """The store folder of each shareable stage: data depends on the data settings and the model (whose
    tokenizer decides what fits), the prior on those and the prior settings."""
    from rexft.splits import data_settings

    data = _digest({"data": data_settings(cfg), "model": asdict(cfg.model)})
    return {"data": f"data-{data}", "prior": f"prior-{data}-{_digest(asdict(cfg.prior))}"}


def adopt_shared(cfg: RunConfig, sweep_dir: Path) -> list[str]:
    """Copy the stages another job of the sweep already computed with these settings into this job's run
    directory (the stages' own staleness checks still decide whether they run). Returns what was copied."""
    copied = []
    for stage, key in shared_keys(cfg).items():
        source, target = sweep_dir / SHARED / key / stage, cfg.path / stage
        if source.is_dir() and not target.exists():
            shutil.copytree(source, target)
            copied.append(stage)
    return copied


def publish_shared(cfg: RunConfig, sweep_dir: Path) -> None:
    """Offer this job's data and prior to the jobs after it (written under a temporary name and renamed: a
    job reading the store never sees half a folder; the first of two concurrent jobs wins)."""
    for stage, key in shared_keys(cfg).items():
        source, target = cfg.path / stage, sweep_dir / SHARED / key / stage
        if not source.is_dir() or target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{stage}."))
        shutil.copytree(source, staging / stage)
        try:
            os.rename(staging / stage, target)
        except OSError:  # another job published it first
            pass
        shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------------------ objective
def tuning_config(cfg: RunConfig) -> RunConfig:
    """The ``tune`` step: rexft eval on the tuning split, written to run_dir/tuning/."""
    return replace(cfg, eval=replace(cfg.eval, split="tuning", output=TUNING_OUTPUT))


def metric_key(metric: str, results: dict) -> str:
    """sweep.metric as a results.json key; auto: ROUGE-L where the held-in tasks are generative, else accuracy."""
    if metric != "auto":
        return metric
    return "mean_rouge_l" if results.get("mean_rouge_l") is not None else "mean_accuracy"


def direction(metric: str) -> str:
    return "maximize" if metric == "auto" else METRICS[metric]


def objective(cfg: RunConfig) -> float | None:
    """sweep.metric of the job's tuning results (None: the job has none)."""
    path = cfg.path / TUNING_OUTPUT / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    value = results.get(metric_key(cfg.sweep.metric, results))
    return None if value is None else float(value)


# --------------------------------------------------------------------------------------------- report
@dataclass
class Job:
    name: str
    params: dict[str, str]
    status: str  # ok | failed | running (a step started and has not finished: running now, or killed)
    tuning: float | None
    eval: float | None
    metric: str
    tokens_per_s: float | None
    trainable: int | None
    seconds: float
    error: str | None


def _results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_job(job_dir: Path, metric: str = "auto") -> Job:
    record = read_record(job_dir)
    steps = record["steps"]
    failed = next((s for s in steps.values() if s["status"] == "failed"), None)
    running = any(s["status"] == "running" for s in steps.values())
    tuning, evaluated = _results(job_dir / TUNING_OUTPUT / "results.json"), _results(job_dir / "eval" / "results.json")
    key = metric_key(metric, tuning or evaluated)
    metrics = read_jsonl(job_dir / "metrics.jsonl") if (job_dir / "metrics.jsonl").is_file() else []
    speeds = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
    adapter = job_dir / "adapter" / ADAPTER_CONFIG
    trainable = json.loads(adapter.read_text()).get("parameters", {}).get("trainable") if adapter.is_file() else None
    params = dict(o.split("=", 1) for o in record.get("overrides", []) if "=" in o)
    return Job(job_dir.name, params, "failed" if failed else ("running" if running or not steps else "ok"), tuning.get(key),
               evaluated.get(key), key, speeds[-1] if speeds else None, trainable,
               sum(s["seconds"] for s in steps.values()), failed.get("error") if failed else None)


def sweep_jobs(sweep_dir: Path, metric: str = "auto") -> list[Job]:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise RexftError(f"{sweep_dir} is not a sweep directory (`rexft <command> -m ...` makes one)")
    jobs = [read_job(d, metric) for d in sorted(sweep_dir.iterdir()) if (d / RECORD).is_file()]
    if not jobs:
        raise RexftError(f"{sweep_dir} holds no sweep jobs (no */{RECORD})")
    return jobs


def best(jobs: list[Job], by: str = "tuning") -> Job | None:
    """The finished job with the best tuning metric (by its direction)."""
    scored = [j for j in jobs if j.status == "ok" and getattr(j, by) is not None and not math.isnan(getattr(j, by))]
    if not scored:
        return None
    sign = 1 if METRICS.get(scored[0].metric, "maximize") == "maximize" else -1
    return max(scored, key=lambda j: sign * getattr(j, by))


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if isinstance(value, int) or abs(value) >= 1000 else f"{value:.{digits}g}"


def report_table(jobs: list[Job]) -> str:
    swept = sorted({k for j in jobs for k in j.params if len({jj.params.get(k) for jj in jobs}) > 1})
    metric = next((j.metric for j in jobs if j.tuning is not None or j.eval is not None), jobs[0].metric)
    chosen = best(jobs)
    head = ["job", *swept, f"tuning {metric}", f"eval {metric}", "tokens/s", "trainable", "seconds", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for job in jobs:
        mark = " **(best)**" if chosen is not None and job is chosen else ""
        status = job.status if job.error is None else f"failed: {job.error.splitlines()[-1][:120]}"
        lines.append("| " + " | ".join([job.name + mark, *(job.params.get(k, "-") for k in swept), _number(job.tuning),
                                         _number(job.eval), _number(job.tokens_per_s), _number(job.trainable),
                                         f"{job.seconds:.0f}", status]) + " |")
    sense = METRICS.get(metric, "maximize").replace("imize", "")
    lines.append(f"\nBest is chosen on the tuning split ({metric}, {sense} is better); the eval column is the "
                 "reported rows, never used to choose.")
    return "\n".join(lines)


def plot_metric_vs_lr(curves: dict[str, dict[float, float]], ylabel: str, path: Path) -> None:
    """One line per label: the metric against the learning rate (log axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, points in sorted(curves.items()):
        lrs = sorted(points)
        ax.plot(lrs, [points[lr] for lr in lrs], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("trainer.lr")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lr_plot(jobs: list[Job], path: Path, group_key: str = "adapter") -> bool:
    """The tuning metric against trainer.lr, one line per adapter (or other swept group)."""
    points = [j for j in jobs if "trainer.lr" in j.params and j.tuning is not None]
    if len({j.params["trainer.lr"] for j in points}) < 2:
        return False
    others = sorted({k for j in points for k in j.params if k not in ("trainer.lr", group_key)
                     and len({jj.params.get(k) for jj in points}) > 1})
    curves: dict[str, dict[float, float]] = {}
    for job in points:
        label = ", ".join([job.params.get(group_key, "")] + [f"{k}={job.params.get(k)}" for k in others]).strip(", ")
        curves.setdefault(label or "run", {})[float(job.params["trainer.lr"])] = job.tuning
    plot_metric_vs_lr(curves, f"tuning split: {points[0].metric}", path)
    return True


def sweep_report(sweep_dir: Path, metric: str = "auto") -> str:
    """``rexft sweep report DIR``: the table (printed, sweep.md), the jobs as JSON (sweep.json) and the plot
    (sweep.png, where the sweep varies trainer.lr)."""
    sweep_dir = Path(sweep_dir)
    jobs = sweep_jobs(sweep_dir, metric)
    table = report_table(jobs)
    (sweep_dir / "sweep.md").write_text(table + "\n")
    write_json(sweep_dir / "sweep.json", [asdict(j) for j in jobs])
    plotted = lr_plot(jobs, sweep_dir / "sweep.png")
    print(table)
    print(f"wrote {sweep_dir / 'sweep.md'}, sweep.json" + (" and sweep.png" if plotted else ""))
    return table

