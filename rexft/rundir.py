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
import tempfile
from pathlib import Path

from rexft.config import RunConfig


def save_resolved_config(cfg: RunConfig, yaml_text: str, command: str) -> Path:
    """Written before the stage does any work, so every run records what it was asked to do."""
    cfg.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.path / f"config.{command}.yaml", yaml_text)
    return atomic_write_text(cfg.path / "config.yaml", yaml_text)


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
