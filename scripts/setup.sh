#!/usr/bin/env bash
# Create .venv and install rexft with its test, offline, harness (lm-eval), serve (FastAPI) and sweep (Optuna
# sweeper, submitit launcher) extras.
#   CPU machines: torch==2.13.0 (the CPU build; a bare `torch` may pull a multi-GB CUDA build).
#   GPU machines: REXFT_TORCH="torch" bash scripts/setup.sh   (or any CUDA torch spec)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "${REXFT_TORCH:-torch==2.13.0}"
python -m pip install --quiet -e ".[dev,offline,harness,serve,sweep]"
