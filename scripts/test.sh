#!/usr/bin/env bash
# Install from scratch and run the test suite (what .ci/run calls). pytest's exit 5 (no tests) fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# vLLM (its own environment, .venv-vllm) for the serving tests against a real vLLM; where it cannot be
# installed those tests skip and say so.
bash scripts/setup_vllm.sh >/dev/null || echo "scripts/setup_vllm.sh failed: the vLLM serving tests will skip" >&2
. .venv/bin/activate
python -m pytest -q "$@"
