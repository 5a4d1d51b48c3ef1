"""How `rexft data` scales with the number of tasks: a source whose task column holds 120 tasks against
the 14 built-in tasks at a similar number of examples, and the SNI source at 30, 60 and 120 tasks.

    python scripts/bench_data.py [--data ../shared/data] [--repeats 2]

Each configuration runs the real CLI (`rexft data`, SmolLM2's tokenizer, nothing cached but datasets'
parsed files, warmed by a first run) and reports wall seconds, examples, tasks and seconds per 1,000 examples.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from rexft.modeling import machine_summary


def run(overrides: list[str], repeats: int) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as run_dir:
        command = [sys.executable, "-m", "rexft", "data", *overrides, f"run_dir={run_dir}"]
        subprocess.run(command, check=True, capture_output=True)  # warm-up: datasets' parse cache, imports
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            best = min(best, time.perf_counter() - start)
        stats = json.loads((Path(run_dir) / "data" / "stats.json").read_text())
    return best, stats


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(machine_summary(), flush=True)  # what the figures below depend on
    local = f"data.local_dir={args.data}"
    configs = {
        "SNI source, 30 tasks (task column)": ["recipe=demo-sni", local, "data.sources.sni.max_tasks=30",
                                               "data.train_per_task=null", "data.eval_per_task=null"],
        "SNI source, 60 tasks (task column)": ["recipe=demo-sni", local, "data.sources.sni.max_tasks=60",
                                               "data.train_per_task=null", "data.eval_per_task=null"],
        "SNI source, 120 tasks (task column)": ["recipe=demo-sni", local, "data.sources.sni.max_tasks=null",
                                                "data.train_per_task=null", "data.eval_per_task=null"],
        "14 built-in tasks, capped to a similar size": ["recipe=demo", local, "data.max_length=768",
                                                        "data.train_per_task=900", "data.eval_per_task=150"],
    }
    print("| configuration | tasks | examples (train + eval) | seconds | seconds per 1,000 examples |")
    print("|---|---|---|---|---|")
    for name, overrides in configs.items():
        seconds, stats = run(overrides, args.repeats)
        n = sum(t["train"] + t["eval"] for t in stats["tasks"].values())
        print(f"| {name} | {len(stats['tasks'])} | {n:,} | {seconds:.1f} | {1000 * seconds / n:.2f} |", flush=True)


if __name__ == "__main__":
    main()
