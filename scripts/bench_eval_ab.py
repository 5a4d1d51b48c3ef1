"""rexft's own eval time at two commits, alternating on one machine: a refactor's before and after.

    python scripts/bench_eval_ab.py BEFORE [--after HEAD] [--rounds 3] [--protocol generate|first_token]
        [--tasks 40] [--per-task 4] [--max-new-tokens 32] [--batch-size 16]

bench_eval.py's ratios (rexft against generate()) drift with the machine by more than the 5% a refactor is
held to, and its peer takes minutes. The peer's code is the same at both commits, so the ratio of the two
commits' ratios is the ratio of rexft's own times measured side by side. Each commit is checked out into a
git worktree; each round runs one process per commit (the order alternating between rounds), each timing
the protocol once after a warm-up on the same examples and model. Prints each run, the medians, and
whether both commits produced the same predictions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args) -> dict:
    """Time the protocol with the rexft importable here (this commit's), whatever its eval API."""
    import hashlib
    import time

    import torch

    from rexft.cli import compose
    from rexft.config import EvalConfig
    from rexft.data import PromptFormat
    from rexft.modeling import load_model, load_tokenizer

    try:
        from rexft.splits import build_splits
    except ImportError:  # before the one task loader
        from rexft.data import build_splits
    if args.protocol == "generate":
        overrides = ["recipe=demo-sni", f"data.sources.sni.max_tasks={args.tasks}", f"data.eval_per_task={args.per_task}"]
    else:
        overrides = ["recipe=demo", f"data.eval_per_task={args.per_task}"]
    cfg, _ = compose(overrides)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, len(tokenizer)).eval()
    fmt = PromptFormat.for_model(tokenizer, cfg.model)
    examples = [e for s in build_splits(cfg.data) for e in s.eval[: args.per_task]]
    settings = EvalConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    try:
        try:  # engines under rexft.inference (#37), or in eval before
            from rexft.inference import make_engine, prior_state
        except ImportError:
            from rexft.eval import make_engine
            from rexft.eval.engine import prior_state
        from rexft.eval.protocols import Prompts, first_token, generate

        engine = make_engine("auto", model, tokenizer, prior_state(model, None), args.batch_size)
        prompts = Prompts(tokenizer, fmt, cfg.data.max_length)

        def run(batch):
            if args.protocol == "generate":
                return [r.prediction for r in generate(engine, prompts, batch, settings)]
            return [(getattr(r, "predicted", None), getattr(r, "scores", None)) for r in first_token(engine, prompts, batch)]
    except ImportError:  # the Scorer before the eval split
        try:
            from rexft.evaluate import Scorer
        except ImportError:
            from rexft.eval.evaluate import Scorer
        scorer = Scorer(model, tokenizer, fmt, cfg.data.max_length, args.batch_size, progress=False)

        def run(batch):
            if args.protocol == "generate":
                return [r["prediction"] for r in scorer.generate(batch, settings)]
            return [(r.get("predicted"), r.get("scores")) for r in scorer.first_token(batch)]

    run(examples[:4])  # warm-up
    start = time.perf_counter()
    predictions = run(examples)
    seconds = time.perf_counter() - start
    digest = hashlib.sha256(json.dumps(predictions).encode()).hexdigest()[:12]
    import rexft

    return {"seconds": round(seconds, 2), "examples": len(examples), "predictions": digest,
            "threads": torch.get_num_threads(), "rexft": str(Path(rexft.__file__).parent)}


def worktree(commit: str, where: Path) -> Path:
    path = where / commit.replace("/", "_")
    subprocess.run(["git", "worktree", "add", "--detach", "--force", str(path), commit], cwd=ROOT, check=True,
                   capture_output=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--protocol", default="generate", choices=["generate", "first_token"])
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--per-task", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    sys.path.insert(0, str(ROOT))
    from rexft.modeling import machine_summary

    print(machine_summary(), flush=True)  # what the figures below depend on
    passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                   ("protocol", "tasks", "per_task", "max_new_tokens", "batch_size")]
    data = os.environ.get("REXFT_DATA", str((ROOT / "../shared/data").resolve()))  # the worktrees live elsewhere
    with tempfile.TemporaryDirectory(prefix="rexft-ab-") as tmp:
        trees = {name: worktree(commit, Path(tmp)) for name, commit in (("before", args.before), ("after", args.after))}
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        try:
            for round_index in range(args.rounds):
                for name in (("before", "after") if round_index % 2 == 0 else ("after", "before")):
                    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "x", "--child", *passthrough],
                                         cwd=trees[name], env={**os.environ, "PYTHONPATH": str(trees[name]), "REXFT_DATA": data},
                                         capture_output=True, text=True)
                    if out.returncode != 0:
                        raise SystemExit(f"{name} ({trees[name]}) failed:\n{out.stderr[-3000:]}")
                    runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(f"round {round_index + 1} {name}: {runs[name][-1]}", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    before, after = (statistics.median(r["seconds"] for r in runs[n]) for n in ("before", "after"))
    same = {r["predictions"] for r in runs["before"]} == {r["predictions"] for r in runs["after"]}
    print(f"\n{args.protocol}, {runs['after'][0]['examples']} examples, median of {args.rounds} runs each: "
          f"{args.before} {before:.1f} s, {args.after} {after:.1f} s; after/before speed {before / after:.3f}; "
          f"same predictions: {same}")


if __name__ == "__main__":
    main()
