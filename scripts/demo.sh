#!/usr/bin/env bash
# The README's main job, offline: SmolLM2-135M-Instruct on a capped slice of all 14 tasks, on CPU.
#   bash scripts/demo.sh [extra overrides, e.g. adapter=lora run_dir=runs/demo-lora]
#   REXFT_RECIPE=demo-sni bash scripts/demo.sh    (what scripts/demo_sni.sh runs: the SNI demo)
# Data: ../shared/data (override with REXFT_DATA=PATH or data.local_dir=PATH; online users may drop it
# to read the hub). Ends with the accuracy table of the base model and of the trained adapter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch_smollm2.sh >/dev/null
args=(recipe="${REXFT_RECIPE:-demo}" "$@")
rexft data "${args[@]}" | tail -n 4         # the per-task table is in run_dir/data/stats.md
rexft cluster-prior "${args[@]}"
rexft train "${args[@]}"
rexft eval "${args[@]}" eval.use_adapter=false eval.output=eval_base
rexft eval "${args[@]}"
rexft merge-export "${args[@]}" export.overwrite=true
run_dir="$(rexft eval "${args[@]}" --print-config | sed -n 's/^run_dir: //p')"
rexft eval compare "$run_dir/eval_base" "$run_dir/eval"
