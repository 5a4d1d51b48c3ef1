#!/usr/bin/env bash
# The SNI demo, offline on CPU (recipe demo-sni): SmolLM2-135M-Instruct, MoDE 6x4, on 40 of the local
# Super-NaturalInstructions training tasks (../shared/data/sni), then ROUGE-L / exact match / target NLL of
# the base model next to the trained adapter, on held-in tasks and on 10 unseen test tasks apart.
#   bash scripts/demo_sni.sh [extra overrides, e.g. adapter=lora_r64 run_dir=runs/demo-sni-lora]
set -euo pipefail
REXFT_RECIPE=demo-sni exec bash "$(dirname "$0")/demo.sh" "$@"
