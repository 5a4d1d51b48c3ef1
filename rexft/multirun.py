"""``rexft <command> -m key=a,b ...``: Hydra's multirun over rexft's config, one job per combination of values.

With rexft/cli.py, the only module that touches Hydra. Hydra does the sweeping: its sweeper picks each job's
values (the basic grid of ``a,b`` / ``range()`` / ``choice()``, or ``hydra/sweeper=optuna``), its launcher runs
the jobs (in this process, or ``hydra/launcher=submitit_local`` / ``submitit_slurm``). :func:`job` turns one
job's composed config into the typed RunConfig, exactly as a single command would, and runs the command in
the job's own run directory; rexft.sweep keeps the records that make a sweep resumable.

    rexft train -m recipe=demo-sni adapter=lora,mode_6x4 trainer.lr=1e-4,3e-4,1e-3 data.tuning_per_task=4
    rexft train -m hydra/sweeper=optuna hydra.sweeper.n_trials=20 'trainer.lr=tag(log, interval(1e-5, 1e-2))' ...
    rexft sweep report runs/demo-sni/sweep-<id>
"""

from __future__ import annotations

import gc
import hashlib
import logging
import sys
import time
from pathlib import Path

from rexft.cli import ConfigError, _check_override, compose, hydra_error, hydra_overrides, run_command, store_schema, \
    typed_config
from rexft.config import config_root

log = logging.getLogger(__name__)

# keys that say how or where jobs run, not what they compute: a sweep keeps its folder when they change
_NOT_IDENTITY = ("hydra/launcher", "hydra.launcher.", "hydra.sweep.", "hydra.sweeper.n_jobs", "sweep.")


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception as err:
        raise ConfigError(f"sweep overrides: {str(err).strip().splitlines()[0]}") from None


def _key(override) -> str:
    return override.get_key_element().lstrip("+~")


def check_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Every value of every swept key checked as a single command would check it (unknown keys, unknown group
    options), before any job runs. Returns (the swept keys, the command line with each sweep at its first
    value: the first job, composed up front)."""
    swept, first = [], []
    for override in _parse(overrides):
        key = _key(override)
        if key == "run_dir":
            raise ConfigError("run_dir: in a sweep every job has its own run directory; set hydra.sweep.dir=PATH "
                              "for where the sweep goes (default: <run_dir>/sweep-<id>)")
        if key.startswith("hydra"):
            continue
        if not override.is_sweep_override():
            first.append(override.input_line)
            continue
        swept.append(key)
        if override.is_interval_sweep():  # Optuna's interval(a, b): only the key can be checked
            _check_override(f"{key}=0")
            continue
        values = list(override.sweep_string_iterator())
        for value in values:
            _check_override(f"{key}={value}")
        first.append(f"{key}={values[0]}")
    return swept, first


def sweep_id(overrides: list[str]) -> str:
    identity = sorted(o for o in overrides if not o.lstrip("+~").startswith(_NOT_IDENTITY))
    return hashlib.sha256("\n".join(identity).encode()).hexdigest()[:8]


def _given(overrides: list[str], key: str) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides)


def multirun(command: str, overrides: list[str]) -> int:
    """Run the sweep, print its report; exit status 1 when a job failed (the others ran)."""
    import tempfile

    from rexft.sweep import direction, sweep_jobs, sweep_report

    swept, first = check_overrides(overrides)
    cfg, _ = compose(first)  # the first job's config, checked before any job runs
    sweep_dir = Path(next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra.sweep.dir=")),
                          Path(cfg.run_dir) / f"sweep-{sweep_id(overrides)}")).resolve()
    extra = [f"hydra.sweep.dir={sweep_dir}", f"hydra.job.name={command}",
             "hydra.sweep.subdir=" + ("${hydra.job.override_dirname}" if swept else "job"),
             "hydra.job.config.override_dirname.exclude_keys=[" + ",".join(
                 sorted({("recipes" if _key(o) == "recipe" else _key(o)) for o in _parse(overrides)
                         if not o.is_sweep_override() and not _key(o).startswith("hydra")})) + "]"]
    if "hydra/sweeper=optuna" in overrides:  # the objective's direction, and failed trials do not end the study
        if not _given(overrides, "hydra.sweeper.direction"):
            extra.append(f"hydra.sweeper.direction={direction(cfg.sweep.metric)}")
        if not _given(overrides, "hydra.sweeper.max_failure_rate"):
            extra.append("hydra.sweeper.max_failure_rate=1.0")
    served = Path(tempfile.mkdtemp(prefix="rexft-recipe-"))
    translated, recipe_file = hydra_overrides([o for o in overrides if not o.startswith("hydra.sweep.dir=")], served)
    log.info("sweep %s: %s", sweep_dir, " ".join(overrides))
    print(f"rexft: sweep directory {sweep_dir}", file=sys.stderr)
    _launch(command, recipe_file, [*translated, *extra])
    jobs = sweep_jobs(sweep_dir, cfg.sweep.metric)
    print()
    sweep_report(sweep_dir, cfg.sweep.metric)
    failed = [j for j in jobs if j.status == "failed"]
    if failed:
        print(f"rexft: {len(failed)} of {len(jobs)} jobs failed: " + ", ".join(j.name for j in failed[:5])
              + f" (each job's {sweep_dir.name}/<job>/sweep-job.json has its error)", file=sys.stderr)
        return 1
    return 0


def _launch(command: str, recipe_file: Path | None, overrides: list[str]) -> None:
    """hydra.main over configs/rexft.yaml with these overrides, each job running :func:`job`."""
    import hydra

    store_schema()

    @hydra.main(version_base=None, config_path=str(config_root() / "configs"), config_name="rexft")
    def task(composed):
        return job(command, composed, recipe_file)

    argv = sys.argv
    sys.argv = ["rexft", "--multirun", *overrides]
    try:
        task()
    except SystemExit as exit_:  # Hydra exits on a sweep-level error (a bad sweeper value): say it as ours
        if exit_.code:
            raise ConfigError("the sweep did not start (Hydra's message above)") from None
    finally:
        sys.argv = argv


def _digest(merged) -> str:
    """What a step's record is checked against: the resolved config less ``sweep`` (which says what runs
    after a step, not how it runs)."""
    from omegaconf import OmegaConf

    from rexft.sweep import config_digest

    return config_digest(OmegaConf.to_yaml(OmegaConf.masked_copy(merged, [k for k in merged if k != "sweep"])))


def _interrupted(job_dir: Path, name: str, merged) -> bool:
    """The step started with this config and never finished (the process was killed)."""
    from rexft.sweep import read_record

    entry = read_record(job_dir)["steps"].get(name)
    return bool(entry) and entry["status"] == "running" and entry["config"] == _digest(merged)


def _step(job_dir: Path, name: str, merged, run, overrides: list[str]) -> None:
    """One step of a job, skipped when it already finished with this config; its outcome recorded (``running``
    while it runs, so a killed step is known as such)."""
    from rexft.sweep import describe_error, finished, record_step

    digest = _digest(merged)
    if finished(job_dir, name, digest):
        log.info("%s: %s already finished with this config, skipped", job_dir.name, name)
        return
    record_step(job_dir, name, "running", digest, 0.0, overrides)
    start = time.perf_counter()
    try:
        run()
    except Exception as err:
        record_step(job_dir, name, "failed", digest, time.perf_counter() - start, overrides, describe_error(err))
        err.recorded = True
        raise
    record_step(job_dir, name, "ok", digest, time.perf_counter() - start, overrides)


def job(command: str, composed, recipe_file: Path | None) -> float | None:
    """One job: the typed config in the job's run directory, the command's stages, then sweep.then's steps for
    train (tune: rexft eval on the tuning split into tuning/; eval: the reported evaluation). Returns the
    objective (sweep.metric on the tuning split) or None. A failure is recorded, logged, and returns None
    (a failed trial to Optuna): the sweep goes on."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from rexft.sweep import adopt_shared, describe_error, objective, publish_shared, record_step, tuning_config

    hc = HydraConfig.get()
    job_dir, sweep_dir = Path(hc.runtime.output_dir), Path(hc.sweep.dir)
    overrides = [o.replace("recipes=", "recipe=", 1) if o.startswith("recipes=") else o for o in hc.overrides.task]
    try:
        try:
            OmegaConf.set_struct(composed, False)
            composed.run_dir = str(job_dir)
            cfg, merged = typed_config(composed, recipe_file)
        except Exception as err:
            raise err if isinstance(err, ConfigError) else hydra_error(err) from None
        if "optuna" in str(hc.sweeper.get("_target_", "")) and "tune" not in cfg.sweep.then and command == "train":
            raise ConfigError("hydra/sweeper=optuna needs each job's objective: keep 'tune' in sweep.then "
                              "(and data.tuning_per_task > 0)")
        adopt_shared(cfg, sweep_dir)
        yaml_text = OmegaConf.to_yaml(merged)
        if command == "train" and _interrupted(job_dir, "train", merged):
            from rexft.train import checkpoint_dirs

            if checkpoint_dirs(cfg.path):
                log.info("%s: training was interrupted; resuming from %s", job_dir.name, checkpoint_dirs(cfg.path)[-1])
                cfg.trainer.resume = True
        _step(job_dir, command, merged, lambda: run_command(command, cfg, yaml_text), overrides)
        publish_shared(cfg, sweep_dir)
        if command == "train":
            for then in cfg.sweep.then:
                if then == "tune" and cfg.data.tuning_per_task == 0:
                    log.warning("%s: no tuning split (data.tuning_per_task=0): the job returns no objective",
                                job_dir.name)
                    continue
                step_cfg = tuning_config(cfg) if then == "tune" else cfg
                step_merged = OmegaConf.merge(merged, {"eval": {"split": step_cfg.eval.split,
                                                                "output": step_cfg.eval.output}})
                step_yaml = OmegaConf.to_yaml(step_merged)
                _step(job_dir, then, step_merged, lambda: run_command("eval", step_cfg, step_yaml), overrides)
        return objective(cfg)
    except Exception as err:
        if not getattr(err, "recorded", False):
            record_step(job_dir, command, "failed", "", 0.0, overrides, describe_error(err))
        log.error("job %s failed: %s", job_dir.name, describe_error(err))
        return None
    finally:
        gc.collect()
