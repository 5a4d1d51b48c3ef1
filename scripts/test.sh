#!/usr/bin/env bash
# Install from scratch and run the test suite (what .ci/run calls). pytest's exit 5 (no tests) fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
