#!/usr/bin/env bash
# The SNI demo, offline on CPU: SmolLM2-135M-Instruct, MoDE 6x4, on a capped slice of the 120 local
# Super-NaturalInstructions training tasks (../shared/data/sni), then ROUGE-L / exact match / target NLL of
# the base model next to the trained adapter, on held-in tasks and on the 30 unseen test tasks apart.
#   bash scripts/demo_sni.sh [extra overrides, e.g. adapter=lora_r64 run_dir=runs/demo-sni-lora]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch_smollm2.sh >/dev/null
args=(recipe=demo-sni "$@")
rexft data "${args[@]}" | tail -n 3
rexft cluster-prior "${args[@]}" | head -n 1
rexft train "${args[@]}"
rexft eval "${args[@]}" eval.use_adapter=false eval.output=eval_base
rexft eval "${args[@]}"
rexft merge-export "${args[@]}" export.overwrite=true
run_dir="$(rexft eval "${args[@]}" --print-config | sed -n 's/^run_dir: //p')"
rexft eval compare "$run_dir/eval_base" "$run_dir/eval"
