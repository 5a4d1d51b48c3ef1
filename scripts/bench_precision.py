"""Training tokens/s in float32 against bf16 autocast, through the real CLI, alternating over rounds.

    python scripts/bench_precision.py [--recipe demo] [--steps 8] [--rounds 2]

Runs ``rexft train recipe=R trainer.max_steps=N`` with ``trainer.mixed_precision=no`` and ``=bf16`` in turn
(the order alternating between rounds) on the same data and prior, reads the tokens/s and the last loss each
logged, and prints the medians and what ``trainer.mixed_precision=auto`` picks on this machine. bf16 is a gain
only where the hardware computes it natively (AVX512-BF16 / AMX, a bf16 GPU); elsewhere it is emulated.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rexft.modeling import machine_summary
from rexft.train import resolve_mixed_precision


def train(recipe: str, run_dir: Path, steps: int, precision: str) -> dict:
    subprocess.run([sys.executable, "-m", "rexft", "train", f"recipe={recipe}", f"run_dir={run_dir}",
                    f"trainer.max_steps={steps}", f"trainer.mixed_precision={precision}", "trainer.routing_stats_every=0"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return {"tokens_per_s": last["tokens_per_s"], "loss": last["loss"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(machine_summary(), flush=True)  # what the figures below depend on
    results: dict[str, list[dict]] = {"no": [], "bf16": []}
    with tempfile.TemporaryDirectory() as tmp:
        seed = Path(tmp) / "seed"  # data and prior once, shared by every run
        for stage in ("data", "cluster-prior"):
            subprocess.run([sys.executable, "-m", "rexft", stage, f"recipe={args.recipe}", f"run_dir={seed}"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for round_index in range(args.rounds):
            for precision in (("no", "bf16") if round_index % 2 == 0 else ("bf16", "no")):
                run_dir = Path(tmp) / f"{precision}-{round_index}"
                shutil.copytree(seed, run_dir)
                results[precision].append(train(args.recipe, run_dir, args.steps, precision))
                print(f"round {round_index + 1} {precision}: {results[precision][-1]}", flush=True)
                shutil.rmtree(run_dir)
    speed = {p: statistics.median(r["tokens_per_s"] for r in runs) for p, runs in results.items()}
    print(f"\nrecipe {args.recipe}, {args.steps} steps, median of {args.rounds} rounds; auto picks "
          f"{resolve_mixed_precision('auto')} here")
    print("| trainer.mixed_precision | tokens/s | last loss | vs float32 |\n|---|---|---|---|")
    for precision, runs in results.items():
        print(f"| {precision} | {speed[precision]:.0f} | {runs[-1]['loss']:.4f} | {speed[precision] / speed['no']:.2f}x |")


if __name__ == "__main__":
    main()
