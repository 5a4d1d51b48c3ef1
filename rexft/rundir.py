"""The run directory every stage reads from and writes to.

    run_dir/
      config.yaml            resolved config of the latest command (config.<command>.yaml per command)
      data/                  formatted examples + stats      (rexft data)
      prior/                 centroids, metadata, report     (rexft cluster-prior)
      checkpoints/step-N/    adapter + optimizer state       (rexft train)
      adapter/               final adapter                   (rexft train)
      metrics.jsonl          training log                    (rexft train)
      eval/                  results.json, predictions.jsonl (rexft eval)
      export/                merged model / PEFT adapters    (rexft merge-export)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rexft.config import ConfigError, RunConfig, task_specs
from rexft.errors import RexftError


def launch_rank() -> int:
    """This process's global rank as the launcher set it (torchrun, accelerate launch and deepspeed set RANK;
    mpirun its own variable), 0 outside a launch. Known before any process group exists."""
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def save_resolved_config(cfg: RunConfig, yaml_text: str, command: str) -> Path:
    """Written before the stage does any work, so every run records what it was asked to do; by the main
    process of a launch only (the others would write the same file again)."""
    if launch_rank() != 0:
        return cfg.path / "config.yaml"
    cfg.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.path / f"config.{command}.yaml", yaml_text)
    return atomic_write_text(cfg.path / "config.yaml", yaml_text)


def folder_name(task: str) -> str:
    """A task name as one file or folder name: path separators and other unsafe characters percent-encoded
    (``returns/exchanges`` -> ``returns%2Fexchanges``), a leading dot too; ``urllib.parse.unquote`` reverses it."""
    from urllib.parse import quote

    name = quote(task, safe=" -_.+=,@()[]")
    return "%2E" + name[1:] if name.startswith(".") else name


@contextmanager
def restored_on_error(run_dir: Path) -> Iterator[None]:
    """A command that fails leaves the run directory as it found it: a directory it created is removed when it
    holds nothing but the configs written, and config files it replaced are put back (by the main process of a
    launch: the others wrote nothing)."""
    if launch_rank() != 0:
        yield
        return
    existed = run_dir.is_dir()
    before = {p.name: p.read_bytes() for p in run_dir.glob("config*.yaml")} if existed else {}
    try:
        yield
    except Exception:
        if not existed:
            if run_dir.is_dir() and all(p.name.startswith("config") for p in run_dir.iterdir()):
                shutil.rmtree(run_dir)
        else:
            for path in run_dir.glob("config*.yaml"):
                if path.name not in before:
                    path.unlink()
            for name, text in before.items():
                (run_dir / name).write_bytes(text)
        raise


def atomic_write_text(path: Path, text: str) -> Path:
    """Write to a temporary file beside ``path`` and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)
    return path


def write_json(path: Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: Path, rows) -> Path:
    return atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def saved_config(run_dir: Path) -> RunConfig:
    """The typed config a run directory recorded: the one its adapter was trained with (adapter/config.yaml,
    else config.train.yaml, else the latest config.yaml), with ``run_dir`` set to where the folder is now."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    run_dir = Path(run_dir)
    found = [run_dir / name for name in ("adapter/config.yaml", "config.train.yaml", "config.yaml")
             if (run_dir / name).is_file()]
    if not found:
        raise RexftError(f"{run_dir} is not a run directory (no config.yaml; `rexft train` writes one)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(found[0]), {"run_dir": str(run_dir)})
        typed: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise RexftError(f"{found[0]}: {str(err).strip().splitlines()[0]}") from None
    try:
        typed.data.sources = task_specs(typed.data.sources)
    except ConfigError as err:
        raise RexftError(f"{found[0]}: {err}") from None
    return typed
