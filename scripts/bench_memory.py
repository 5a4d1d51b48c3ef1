"""`rexft plan` against the measured training memory of real runs on this CPU.

    python scripts/bench_memory.py [--cases small small-ckpt smollm2-shape] [--json]

For each case (the smoke recipe on boolq, whose examples fill data.max_length, on a tiny random LLaMA of a
larger shape built from its config), `rexft data` prepares the split, then a fresh process trains a few
steps and measures: the bytes of the tensors alive at the last step's start (base weights and buffers,
adapters, optimizer state) plus the peak of torch's allocations during that step (torch's profiler with
profile_memory: torch keeps no CPU allocator statistics). That is the peak of live tensor bytes, the
quantity the plan predicts (on a GPU, CUDA's max_memory_allocated). The rise of the resident set over the
process before the model was built (interpreter, libraries and malloc's retained pages included) is
printed beside it. The plan is computed from the config alone (no weights), as `rexft plan` does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BOOLQ = ["recipe=smoke", "prior=none", "data.tasks=[boolq]", "data.train_per_task=16", "trainer.mixed_precision=no"]
CASES = {  # name: overrides (float32 on every machine)
    "tiny": [*BOOLQ, "data.max_length=256", "trainer.batch_size=4", "model.tiny.hidden_size=256",
             "model.tiny.intermediate_size=688", "model.tiny.num_hidden_layers=2", "model.tiny.num_attention_heads=4",
             "model.tiny.num_key_value_heads=2"],  # the test's case (tests/test_plan.py)
    "small": [*BOOLQ, "data.max_length=384", "trainer.batch_size=4", "model.tiny.hidden_size=512",
              "model.tiny.intermediate_size=1376", "model.tiny.num_hidden_layers=4", "model.tiny.num_attention_heads=8",
              "model.tiny.num_key_value_heads=4"],
    "small-ckpt": [*BOOLQ, "data.max_length=384", "trainer.batch_size=4", "model.tiny.hidden_size=512",
                   "model.tiny.intermediate_size=1376", "model.tiny.num_hidden_layers=4",
                   "model.tiny.num_attention_heads=8", "model.tiny.num_key_value_heads=4",
                   "trainer.gradient_checkpointing=true"],
    "small-lora": [*BOOLQ, "adapter=lora", "data.max_length=384", "trainer.batch_size=4", "model.tiny.hidden_size=512",
                   "model.tiny.intermediate_size=1376", "model.tiny.num_hidden_layers=4",
                   "model.tiny.num_attention_heads=8", "model.tiny.num_key_value_heads=4"],
    # SmolLM2-135M's block shape (576 wide, 1536 MLP, 30 blocks, 9 heads / 3 KV heads), the byte vocabulary
    "smollm2-shape": [*BOOLQ, "data.max_length=256", "trainer.batch_size=2", "model.tiny.hidden_size=576",
                      "model.tiny.intermediate_size=1536", "model.tiny.num_hidden_layers=30",
                      "model.tiny.num_attention_heads=9", "model.tiny.num_key_value_heads=3"],
}


def measure_training_peak(overrides: list[str], steps: int = 2) -> dict[str, int]:
    """Trains ``steps`` optimizer steps in this process; the tensors alive at the last step's start plus the
    profiler's peak of allocations during it, and the resident set's peak rise (bytes)."""
    from torch.profiler import ProfilerActivity, profile

    from rexft.cli import compose
    from rexft.train import Trainer

    def status(field: str) -> int:
        lines = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))

    cfg, _ = compose(overrides)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
    before = status("VmRSS")
    trainer = Trainer(cfg)
    trainer.resume()
    trainer.model.train()
    for step in range(steps - 1):
        trainer.step(step)
    tensors = [*trainer.model.parameters(), *trainer.model.buffers(),
               *(v for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v))]
    alive = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.step(steps - 1)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return {"measured": alive + peak, "rss_rise": status("VmHWM") - before}


def run_case(name: str, run_dir: Path) -> dict:
    from rexft.cli import compose
    from rexft.plan import memory_plan

    overrides = [*CASES[name], f"run_dir={run_dir}"]
    subprocess.run([sys.executable, "-m", "rexft", "data", *overrides], cwd=ROOT, check=True, capture_output=True)
    child = subprocess.run([sys.executable, __file__, "--measure", json.dumps(overrides)], cwd=ROOT, check=True,
                           capture_output=True, text=True)
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    cfg, _ = compose(overrides)
    plan = memory_plan(cfg, world_size=1, device="cpu")
    return {"case": name, "plan": plan.total, "activations": plan.activations, **measured,
            "ratio": plan.total / measured["measured"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json", action="store_true", help="one JSON object per case")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure these overrides in this process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_training_peak(json.loads(args.measure))))
        return
    from rexft.modeling import machine_summary

    if not args.json:
        print(machine_summary(probe=False))
        print(f"{'case':<15} {'plan MiB':>9} {'measured MiB':>13} {'plan/measured':>14} {'RSS rise MiB':>13}")
    for name in args.cases:
        with tempfile.TemporaryDirectory() as tmp:
            row = run_case(name, Path(tmp) / name)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            mib = 2 ** 20
            print(f"{name:<15} {row['plan'] / mib:9.1f} {row['measured'] / mib:13.1f} {row['ratio']:14.3f} "
                  f"{row['rss_rise'] / mib:13.1f}", flush=True)


if __name__ == "__main__":
    main()
