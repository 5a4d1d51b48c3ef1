"""Quality study on a real pretrained model: SmolLM2-135M-Instruct on the 14-task mixture, or on SNI.

    python scripts/quality_study.py --per-task 48 --eval-per-task 30 --out docs/quality_study_cpu.md
    # the GPU study: --per-task 100000 --epochs 3 (all local train data)
    python scripts/quality_study.py --benchmark sni --tasks 40 --per-task 8 --eval-per-task 3 \
        --unseen-tasks 10 --unseen-per-task 4 --lr 1e-3 --out docs/quality_study_sni_cpu.md
    # the SNI GPU study: --benchmark sni --tasks 120 --per-task 100 --eval-per-task 20 --unseen-tasks 30
    #   --unseen-per-task 100 --epochs 3

SNI (``--benchmark sni``, recipe demo-sni): the staged SNI training tasks (the first --tasks of 120),
held-in evaluation on their validation instances and the unseen test tasks apart, by ROUGE-L, exact
match and target NLL (mean nats per target token), with paired intervals per example like the
accuracy study.

Every method is trained through the real CLI on the same examples, steps, sequence length and
learning-rate budget (one value, --lr, for all), then evaluated on the same held-out validation
examples (first_token protocol). The report gives per-task and mean accuracy with 95% Wilson intervals,
the gold answer letter's NLL (far lower variance than accuracy at this size), trainable parameters,
wall time, and paired 95% intervals for each method's difference to the base model and to LoRA: a
difference is claimed only where its interval excludes zero.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

METHODS = {
    "base (zero-shot)": None,
    "lora r=32": ["adapter=lora", "prior=none"],
    "trex 4x8 + prior": ["adapter=trex"],
    "trex 4x8, no prior": ["adapter=trex", "adapter.use_prior=false"],
    "mode 6x4": ["adapter=mode", "prior=none"],
    "molora 4x8": ["adapter=molora", "prior=none"],
}


SNI_METHODS = {
    "base (zero-shot)": None,
    "lora r=32": ["adapter=lora", "prior=none"],
    "mode 6x4": ["adapter=mode_6x4", "prior=none"],
    "molora 4x8": ["adapter=molora", "prior=none"],
    "trex 4x8 + prior": ["adapter=trex", "prior=minilm"],
    "trex 4x8, no prior": ["adapter=trex", "prior=none"],
}


def rexft(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rexft", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def run_method(name: str, extra: list[str] | None, common: list[str], root: Path, shared_prior: Path,
               wall: dict, params: dict, commands: list[str]) -> Path:
    """Train and evaluate one method through the CLI (the base model: evaluate only), in its own run
    directory with the shared prior; records wall time, trainable parameters and the commands."""
    run_dir = root / name.split(" (")[0].replace(" ", "_").replace(",", "").replace("=", "").replace("+", "plus")
    if extra is None:
        command = ["eval", *common, f"run_dir={run_dir}", "eval.use_adapter=false"]
        wall[name] = rexft(*command)
        commands.append("rexft " + " ".join(command))
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir / "prior", ignore_errors=True)
    shutil.copytree(shared_prior / "prior", run_dir / "prior")
    train = ["train", *common, *extra, f"run_dir={run_dir}"]
    evaluate = ["eval", *common, *extra, f"run_dir={run_dir}"]
    wall[name] = rexft(*train) + rexft(*evaluate)
    commands += ["rexft " + " ".join(train), "rexft " + " ".join(evaluate)]
    params[name] = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["parameters"]["trainable"]
    return run_dir


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b and the half-width of its 95% interval (normal approximation, paired by example)."""
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(1, len(d) - 1)
    return mean, 1.96 * math.sqrt(var / len(d))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-task", type=int, default=48)
    parser.add_argument("--eval-per-task", type=int, default=30)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--root", default="runs/quality")
    parser.add_argument("--out", default="docs/quality_study_cpu.md")
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--benchmark", default="commonsense14", choices=["commonsense14", "sni"])
    parser.add_argument("--tasks", type=int, default=40, help="sni: the first N of the 120 staged training tasks")
    parser.add_argument("--unseen-tasks", type=int, default=10, help="sni: the first N of the 30 unseen test tasks")
    parser.add_argument("--unseen-per-task", type=int, default=4)
    args = parser.parse_args()
    if args.benchmark == "sni":
        return sni_study(args)
    args.methods = args.methods or list(METHODS)
    root = Path(args.root)
    common = ["recipe=demo", f"data.train_per_task={args.per_task}", f"data.eval_per_task={args.eval_per_task}",
              f"data.max_length={args.max_length}", f"trainer.epochs={args.epochs}", f"trainer.lr={args.lr}"]
    shared_prior = root / "prior-source"
    wall = {}
    if not (shared_prior / "prior" / "meta.json").is_file():
        wall["cluster-prior"] = rexft("cluster-prior", *common, f"run_dir={shared_prior}")
    results, params, commands = {}, {}, []
    for name in args.methods:
        run_dir = run_method(name, METHODS[name], common, root, shared_prior, wall, params, commands)
        results[name] = {
            "summary": json.loads((run_dir / "eval" / "results.json").read_text()),
            "predictions": [json.loads(l) for l in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()],
        }
        print(f"{name}: mean accuracy {results[name]['summary']['mean_accuracy']:.3f}, {wall[name]:.0f} s", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report(results, params, wall, commands, args))
    print(Path(args.out).read_text())


def report(results, params, wall, commands, args) -> str:
    names = list(results)
    tasks = list(results[names[0]]["summary"]["tasks"])
    n_eval = sum(t["n"] for t in results[names[0]]["summary"]["tasks"].values())
    import os

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    lines = ["# Quality study: SmolLM2-135M-Instruct on the 14-task mixture", "",
             f"Machine: {platform.machine()}, {platform.system()}, {os.cpu_count()} cores, {device}. "
             f"Budget: {args.per_task} training examples per task (fewer where a task has fewer), {args.epochs} epoch(s), "
             f"sequence length <= {args.max_length}, batch 8, lr {args.lr} (the same single value for every method: "
             f"a learning-rate search budget of one), seed 0. Evaluation: {n_eval} held-out validation examples "
             f"({args.eval_per_task} per task; for tasks without a local train split, validation rows disjoint from the "
             "training rows), protocol first_token (restricted argmax over option letters).", "",
             "## Accuracy per task (95% Wilson interval in the mean row)", "",
             "| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(f"{results[n]['summary']['tasks'][task]['accuracy']:.3f}" for n in names) + " |")

    def pooled(name):
        preds = results[name]["predictions"]
        correct = sum(p["predicted"] == p["gold"] for p in preds)
        from rexft.metrics import wilson

        low, high = wilson(correct, len(preds))
        return f"{correct / len(preds):.3f} [{low:.3f}, {high:.3f}]"

    lines.append("| **macro mean** | " + " | ".join(f"**{results[n]['summary']['mean_accuracy']:.3f}**" for n in names) + " |")
    lines.append("| pooled accuracy [95% CI] | " + " | ".join(pooled(n) for n in names) + " |")
    lines += ["", "## Held-out answer NLL per task (nats per gold letter; lower is better)", "",
              "| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(f"{results[n]['summary']['tasks'][task]['nll']:.3f}" for n in names) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{results[n]['summary']['mean_nll']:.3f}**" for n in names) + " |")
    lines += ["", "## Differences, paired by example (95% interval); claimed only where the interval excludes 0", "",
              "| method | vs | accuracy difference | NLL difference | claim |", "|---|---|---|---|---|"]
    for name in names:
        for peer in ("base (zero-shot)", "lora r=32"):
            if name == peer or peer not in results or name == "base (zero-shot)":
                continue
            key = lambda p: (p["task"], p["id"])
            mine = sorted(results[name]["predictions"], key=key)
            theirs = sorted(results[peer]["predictions"], key=key)
            acc, acc_ci = paired([float(p["predicted"] == p["gold"]) for p in mine], [float(p["predicted"] == p["gold"]) for p in theirs])
            nll, nll_ci = paired([p["nll"] for p in mine], [p["nll"] for p in theirs])
            claims = []
            if abs(acc) > acc_ci:
                claims.append(f"accuracy {'higher' if acc > 0 else 'lower'}")
            if abs(nll) > nll_ci:
                claims.append(f"NLL {'lower' if nll < 0 else 'higher'}")
            lines.append(f"| {name} | {peer} | {acc:+.3f} ± {acc_ci:.3f} | {nll:+.3f} ± {nll_ci:.3f} | {', '.join(claims) or 'no significant difference'} |")
    lines += ["", "## Cost", "", "| method | trainable parameters | wall time (train + eval) |", "|---|---|---|"]
    for name in names:
        lines.append(f"| {name} | {params.get(name, 0):,} | {wall[name]:.0f} s |")
    if "cluster-prior" in wall:
        lines.append(f"| (cluster-prior, shared) | - | {wall['cluster-prior']:.0f} s |")
    lines += ["", "## Commands", "", "```bash", f"python scripts/quality_study.py --per-task {args.per_task} "
              f"--eval-per-task {args.eval_per_task} --epochs {args.epochs} --lr {args.lr} --out {args.out}", "# which runs:"]
    lines += commands + ["```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- SNI
def sni_study(args) -> None:
    from rexft.metrics import bootstrap_ci

    methods = {name: SNI_METHODS[name] for name in (args.methods or SNI_METHODS)}
    root = Path(args.root if args.root != "runs/quality" else "runs/quality-sni")
    max_length = args.max_length if args.max_length != 320 else 768
    common = ["recipe=demo-sni", f"data.sources.sni.max_tasks={args.tasks}", f"data.train_per_task={args.per_task}",
              f"data.eval_per_task={args.eval_per_task}", f"data.sources.sni_test.max_tasks={args.unseen_tasks}",
              f"data.sources.sni_test.eval_per_task={args.unseen_per_task}", f"data.max_length={max_length}",
              f"trainer.epochs={args.epochs}", f"trainer.lr={args.lr}"]
    shared_prior = root / "prior-source"
    wall, results, params, commands = {}, {}, {}, []
    if not (shared_prior / "prior" / "meta.json").is_file():
        wall["cluster-prior"] = rexft("cluster-prior", *common, f"run_dir={shared_prior}")
        commands.append("rexft " + " ".join(["cluster-prior", *common, f"run_dir={shared_prior}"]))
    started = time.perf_counter()
    for name, extra in methods.items():
        run_dir = run_method(name, extra, common, root, shared_prior, wall, params, commands)
        predictions = [json.loads(l) for l in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
        results[name] = {"summary": json.loads((run_dir / "eval" / "results.json").read_text()),
                         "predictions": {(p["task"], p["id"]): p for p in predictions if not p.get("dropped")}}
        summary = results[name]["summary"]
        print(f"{name}: held-in ROUGE-L {summary['mean_rouge_l']:.3f}, unseen {summary.get('unseen_mean_rouge_l', 0):.3f}, "
              f"{wall[name]:.0f} s", file=sys.stderr)
    total = time.perf_counter() - started + wall.get("cluster-prior", 0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(sni_report(results, params, wall, commands, args, total, bootstrap_ci))
    print(Path(args.out).read_text())


def sni_report(results, params, wall, commands, args, total, bootstrap_ci) -> str:
    import os

    import torch

    names = list(results)
    first = results[names[0]]["summary"]
    unseen = {t for t, e in first["tasks"].items() if e["unseen"]}
    held = [t for t in first["tasks"] if t not in unseen]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    n_held = sum(first["tasks"][t]["n"] for t in held)
    n_unseen = sum(first["tasks"][t]["n"] for t in unseen)
    lines = ["# SNI quality study: SmolLM2-135M-Instruct on Super-NaturalInstructions tasks", "",
             f"Machine: {platform.machine()}, {platform.system()}, {os.cpu_count()} cores, {device}. Whole study: "
             f"{total / 60:.0f} min. Budget, the same for every method: the first {args.tasks} of the 120 staged SNI training "
             f"tasks (the staged file orders them round-robin over SNI categories), {args.per_task} training instances each, "
             f"{args.epochs} epoch(s), batch 8, lr {args.lr} (one value for every method), sequence length <= 768 "
             "(longer examples dropped), seed 0. Prompt: Tk-Instruct's (definition, input, output cue) in SmolLM2's chat "
             f"template. Evaluation: greedy decoding, at most 32 new tokens; held-in: {n_held} validation instances of the "
             f"training tasks ({args.eval_per_task} per task); unseen: {n_unseen} instances of the first {args.unseen_tasks} "
             f"of SNI's 30 staged test tasks ({args.unseen_per_task} per task), never trained on (mixture adapters route "
             "them with priors from the trained centroids).", "",
             "Metrics: ROUGE-L (F, rouge-score with stemming, max over references), exact match (SQuAD normalisation), "
             "target NLL (mean nats per target token under teacher forcing: the least noisy of the three at this size). "
             "Macro means over tasks with 95% bootstrap intervals (resampling examples within tasks).", "",
             "## Macro means", "",
             "| method | held-in ROUGE-L [95% CI] | held-in EM | held-in target NLL | unseen ROUGE-L [95% CI] | unseen EM | unseen target NLL | trainable parameters | wall time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        s = results[name]["summary"]
        ci, uci = s["mean_rouge_l_ci95"], s.get("unseen_mean_rouge_l_ci95", [0, 0])
        lines.append(f"| {name} | {s['mean_rouge_l']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {s['mean_exact_match']:.3f} | "
                     f"{s['mean_target_nll']:.3f} | {s.get('unseen_mean_rouge_l', 0):.3f} [{uci[0]:.3f}, {uci[1]:.3f}] | "
                     f"{s.get('unseen_mean_exact_match', 0):.3f} | {s.get('unseen_mean_target_nll', 0):.3f} | "
                     f"{params.get(name, 0):,} | {wall[name]:.0f} s |")
    lines += ["", "## Differences, paired by example (95% interval); claimed only where the interval excludes 0", "",
              "| method | vs | split | ROUGE-L difference | EM difference | target NLL difference | claim |",
              "|---|---|---|---|---|---|---|"]
    for name in names:
        for peer in ("base (zero-shot)", "lora r=32"):
            if name == peer or peer not in results or name == "base (zero-shot)":
                continue
            for split, tasks in (("held-in", set(held)), ("unseen", unseen)):
                keys = sorted(k for k in results[name]["predictions"] if k[0] in tasks and k in results[peer]["predictions"])
                if not keys:
                    continue
                mine = [results[name]["predictions"][k] for k in keys]
                theirs = [results[peer]["predictions"][k] for k in keys]
                cells, claims = [], []
                for metric, better in (("rouge_l", 1), ("exact_match", 1), ("target_nll", -1)):
                    diff, half = paired([p[metric] for p in mine], [p[metric] for p in theirs])
                    cells.append(f"{diff:+.3f} ± {half:.3f}")
                    if abs(diff) > half:
                        label = {"rouge_l": "ROUGE-L", "exact_match": "EM", "target_nll": "NLL"}[metric]
                        claims.append(f"{label} {'better' if diff * better > 0 else 'worse'}")
                lines.append(f"| {name} | {peer} | {split} | " + " | ".join(cells) + f" | {', '.join(claims) or 'no significant difference'} |")
    lines += ["", "## Per task (ROUGE-L)", "", "<details><summary>every task, held-in then unseen</summary>", "",
              "| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task in held + sorted(unseen):
        cells = [f"{results[n]['summary']['tasks'][task].get('rouge_l', 0):.3f}" for n in names]
        lines.append(f"| {task}{' (unseen)' if task in unseen else ''} | " + " | ".join(cells) + " |")
    lines += ["", "</details>", "", "## Commands", "", "```bash",
              f"python scripts/quality_study.py --benchmark sni --tasks {args.tasks} --per-task {args.per_task} "
              f"--eval-per-task {args.eval_per_task} --unseen-tasks {args.unseen_tasks} --unseen-per-task {args.unseen_per_task} "
              f"--epochs {args.epochs} --lr {args.lr} --out {args.out}", "# which runs:"]
    lines += commands + ["```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
