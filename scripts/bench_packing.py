"""Useful (non-padding) training tokens per second with sequence packing vs unpacked batches.

    python scripts/bench_packing.py [--recipe demo] [--steps 8]

Runs ``rexft train`` through the CLI three times on the same recipe and data: unpacked in random order,
unpacked in length-grouped batches (the default), and packed rows of data.max_length tokens; reads the
tokens/s it logs (non-padding tokens only) and prints the ratios. Each run trains the same number of
examples per step (packed: rows of several examples).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from rexft.modeling import machine_summary


def run(recipe: str, run_dir: Path, steps: int, extra: list[str]) -> float:
    subprocess.run([sys.executable, "-m", "rexft", "train", f"recipe={recipe}", f"run_dir={run_dir}",
                    f"trainer.max_steps={steps}", "adapter.use_prior=false", "trainer.routing_stats_every=0", *extra],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records[-1]["tokens_per_s"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8, help="unpacked examples per step")
    args = parser.parse_args()
    print(machine_summary(), flush=True)  # what the figures below depend on
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        variants = {
            "unpacked, random order": ["trainer.group_by_length=false", f"trainer.batch_size={args.batch_size}"],
            "unpacked, length-grouped": ["trainer.group_by_length=true", f"trainer.batch_size={args.batch_size}"],
            "packed": ["data.packing=true", "trainer.batch_size=2"],
        }
        for name, extra in variants.items():
            results[name] = run(args.recipe, Path(tmp) / name.replace(" ", "_").replace(",", ""), args.steps, extra)
            shutil.rmtree(Path(tmp) / name.replace(" ", "_").replace(",", ""), ignore_errors=True)
    base = results["unpacked, random order"]
    print(f"recipe {args.recipe}, {args.steps} steps each; useful (non-padding) tokens/s as logged by rexft train")
    print("| batches | useful tokens/s | vs random order |\n|---|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.0f} | {value / base:.2f}x |")


if __name__ == "__main__":
    main()
