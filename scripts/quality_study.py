"""The quality study, tuned fairly: every method's lr chosen on the tuning split, then more seeds at that lr.

    python scripts/quality_study.py run --study sni          # resumable: jobs recorded under docs/studies/ are skipped
    python scripts/quality_study.py collect --study sni      # copy the finished jobs' records (run does it per sweep)
    python scripts/quality_study.py report --study sni       # docs/quality_study_sni_cpu.md from what has finished
    python scripts/quality_study.py run --study cs14         # the 14-task mixture (recipe study-cs14)

Per method, through the real CLI (Hydra multirun, rexft/multirun.py):

    rexft train -m recipe=R adapter=A trainer.lr=3e-4,1e-3,3e-3 hydra.sweep.dir=ROOT/A/tune    # seed 0
    rexft train -m recipe=R adapter=A trainer.lr=<best on the tuning split> trainer.seed=1,2 hydra.sweep.dir=ROOT/A/seeds

Each job trains, scores the tuning split (training rows never trained on: what the lr is chosen by) and then the
reported held-in and unseen rows. The base model is evaluated once. ``run`` copies each finished job's small
records (configs, metrics, results, predictions; not the weights) into docs/studies/<study>/, where ``report``
reads them: the study can be reported, and resumed, from the repository alone.

The report: per method the chosen lr and the tuning curve, held-in and unseen means over seeds, and paired
differences against LoRA r=32 with 95% intervals from a bootstrap over tasks and, within each task, seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STUDIES = {
    "sni": {"recipe": "study-sni", "doc": "docs/quality_study_sni_cpu.md", "metric": "mean_target_nll"},
    "cs14": {"recipe": "study-cs14", "doc": "docs/quality_study_cpu.md", "metric": "mean_nll"},
}
METHODS = {  # in the order they run: the comparisons that matter most finish first
    "lora r=32": "lora",
    "trex 4x8 + prior": "trex",
    "mode 6x4": "mode_6x4",
    "trex 4x8, no prior": "trex_noprior",
    "molora 4x8": "molora",
    "lora r=8": "lora_r8",
}
LRS = ("3e-4", "1e-3", "3e-3")
SEEDS = ("1", "2")  # seed 0 is the tuning job at the chosen lr
KEPT = ("sweep-job.json", "config.yaml", "config.train.yaml", "metrics.jsonl", "adapter/adapter_config.json",
        "tuning/results.json", "tuning/predictions.jsonl", "eval/results.json", "eval/predictions.jsonl",
        "data/stats.json")


def rexft(*args: str) -> int:
    print("+ rexft " + " ".join(args), file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, "-m", "rexft", *args], cwd=REPO).returncode


def collect(job_dir: Path, into: Path) -> None:
    """The job's small records, copied under docs/studies/ (the weights stay in the run directory)."""
    for name in KEPT:
        if (job_dir / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(job_dir / name, into / name)


def collect_sweep(sweep_dir: Path, into: Path) -> None:
    """Every job of the sweep whose steps all finished (a job still running is left for the next call)."""
    for job in sorted(sweep_dir.glob("*/sweep-job.json")):
        steps = json.loads(job.read_text())["steps"]
        if steps and all(s["status"] == "ok" for s in steps.values()):
            collect(job.parent, into / job.parent.name)


def collect_all(args) -> None:
    """``collect``: what has finished so far (while ``run`` is still going, e.g. before a session ends)."""
    root, docs = Path(args.root) / args.study, Path(args.docs) / args.study
    if (root / "base" / "eval" / "results.json").is_file():
        collect(root / "base", docs / "base")
    for sweep in sorted(root.glob("*/*/multirun.yaml")):
        collect_sweep(sweep.parent, docs / sweep.parent.parent.name / sweep.parent.name)


def run(args) -> None:
    study = STUDIES[args.study]
    root, docs = Path(args.root) / args.study, Path(args.docs) / args.study
    recipe = [f"recipe={study['recipe']}", *args.override]
    base = root / "base"
    if not (docs / "base" / "eval" / "results.json").is_file():
        if not (base / "eval" / "results.json").is_file():
            rexft("data", *recipe, f"run_dir={base}")
            rexft("eval", *recipe, f"run_dir={base}", "eval.use_adapter=false")
        collect(base, docs / "base")
    for name in args.methods or METHODS:
        adapter = METHODS[name]
        # What is recorded under docs/ counts as done, so a fresh machine (no run directories) resumes too.
        recorded = method_runs(docs, adapter, study["metric"])
        if len(recorded["runs"]) == 1 + len(SEEDS):
            print(f"{name}: every job is recorded under {docs / adapter}; skipped", file=sys.stderr)
            continue
        started = time.perf_counter()
        lrs = [lr for lr in LRS if lr not in recorded["tuning"]]
        if lrs:
            tune = root / adapter / "tune"
            rexft("train", "-m", *recipe, f"adapter={adapter}", f"trainer.lr={','.join(lrs)}", f"hydra.sweep.dir={tune}")
            collect_sweep(tune, docs / adapter / "tune")
            recorded = method_runs(docs, adapter, study["metric"])
        lr = recorded["lr"]
        if lr is None:
            print(f"{name}: a tuning job did not finish; its seeds wait for the next run", file=sys.stderr)
            continue
        seeds = [seed for seed in SEEDS if seed not in recorded["runs"]]
        if seeds:
            into = root / adapter / "seeds"
            rexft("train", "-m", *recipe, f"adapter={adapter}", f"trainer.lr={lr}", f"trainer.seed={','.join(seeds)}",
                  f"hydra.sweep.dir={into}")
            collect_sweep(into, docs / adapter / "seeds")
        print(f"{name}: lr {lr} chosen on the tuning split; {time.perf_counter() - started:.0f} s", file=sys.stderr)


# ------------------------------------------------------------------------------------------------- report
def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _predictions(path: Path) -> dict[tuple, dict]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["task"], r["id"]): r for r in rows if "id" in r}


def method_runs(docs: Path, adapter: str, metric: str) -> dict:
    """A method's tuning jobs (lr -> tuning metric) and its runs at the chosen lr (seed -> eval records)."""
    tuning, runs, seconds = {}, {}, 0.0
    for job in sorted((docs / adapter / "tune").glob("*/sweep-job.json")):
        record = json.loads(job.read_text())
        params = dict(o.split("=", 1) for o in record["overrides"])
        seconds += sum(s["seconds"] for s in record["steps"].values())
        results = _read(job.parent / "tuning" / "results.json")
        if results is not None and all(s["status"] == "ok" for s in record["steps"].values()):
            lr = next((g for g in LRS if float(g) == float(params["trainer.lr"])), params["trainer.lr"])
            tuning[lr] = (results[metric], job.parent)
    if len(tuning) < len(LRS):
        return {"tuning": {lr: v for lr, (v, _) in tuning.items()}, "runs": {}, "seconds": seconds, "lr": None}
    better = min if metric.endswith("nll") else max
    lr = better(tuning, key=lambda k: tuning[k][0])
    candidates = [("0", tuning[lr][1])] + [
        (json.loads(j.read_text())["overrides"], j.parent) for j in sorted((docs / adapter / "seeds").glob("*/sweep-job.json"))]
    for seed, job_dir in candidates:
        if isinstance(seed, list):
            seed = dict(o.split("=", 1) for o in seed).get("trainer.seed", "?")
            seconds += sum(s["seconds"] for s in json.loads((job_dir / "sweep-job.json").read_text())["steps"].values())
        results = _read(job_dir / "eval" / "results.json")
        if results is not None:
            metrics = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
            runs[seed] = {"results": results, "predictions": _predictions(job_dir / "eval" / "predictions.jsonl"),
                          "tokens_per_s": next((m["tokens_per_s"] for m in reversed(metrics) if "tokens_per_s" in m), None),
                          "steps": max((m.get("step", 0) for m in metrics), default=0),
                          "trainable": (_read(job_dir / "adapter" / "adapter_config.json") or {}).get("parameters", {}).get("trainable")}
    return {"tuning": {k: v for k, (v, _) in tuning.items()}, "runs": runs, "seconds": seconds, "lr": lr}


def paired_bootstrap(mine: dict, theirs: dict, field: str, tasks: list[str], resamples: int = 2000,
                     seed: int = 0) -> tuple[float, float, float] | None:
    """Mean over tasks of the per-task mean difference (mine - theirs, paired by example and by seed index),
    with a 95% percentile interval from resampling tasks and, within each task, seeds."""
    import numpy as np

    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return None
    diffs = np.full((len(tasks), len(seeds)), np.nan)
    for i, task in enumerate(tasks):
        for j, s in enumerate(seeds):
            pairs = [(r[field], theirs[s]["predictions"][key][field]) for key, r in mine[s]["predictions"].items()
                     if key[0] == task and key in theirs[s]["predictions"] and r.get(field) is not None]
            if pairs:
                diffs[i, j] = sum(a - b for a, b in pairs) / len(pairs)
    diffs = diffs[~np.isnan(diffs).any(1)]
    if not len(diffs):
        return None
    rng = np.random.default_rng(seed)
    t = rng.integers(0, len(diffs), size=(resamples, len(diffs)))
    s = rng.integers(0, diffs.shape[1], size=(resamples, len(diffs), diffs.shape[1]))
    means = np.take_along_axis(diffs[t], s, axis=2).mean(axis=(1, 2))
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diffs.mean()), float(low), float(high)


def report(name: str, docs: Path, doc: Path) -> None:
    import statistics

    study = STUDIES[name]
    metric = study["metric"]
    generative = name == "sni"
    fields = [("rouge_l", "ROUGE-L", "mean_rouge_l"), ("target_nll", "target NLL", "mean_target_nll")] if generative \
        else [("correct", "accuracy", "mean_accuracy"), ("nll", "answer NLL", "mean_nll")]
    methods = {m: method_runs(docs, a, metric) for m, a in METHODS.items() if (docs / a).is_dir()}
    base = _read(docs / "base" / "eval" / "results.json")
    base_runs = {"0": {"predictions": _predictions(docs / "base" / "eval" / "predictions.jsonl")}} if base else {}
    for runs in [base_runs] + [m["runs"] for m in methods.values()]:
        for run in runs.values():  # a choice row's correctness as a number, paired like ROUGE-L
            for row in run["predictions"].values():
                if "gold" in row:
                    row["correct"] = float(row.get("predicted") == row["gold"])
    lines = [f"Tuning metric: `{metric}` on the tuning split (lower is better for NLL); lr grid {', '.join(LRS)}; "
             f"seeds 0 (the tuning run) and {', '.join(SEEDS)} at the chosen lr.", "",
             "### Learning rate, chosen on the tuning split", "",
             "| method | " + " | ".join(f"lr {lr}" for lr in LRS) + " | chosen |", "|---|" + "---|" * (len(LRS) + 1)]
    for method, m in methods.items():
        lines.append(f"| {method} | " + " | ".join(f"{m['tuning'][lr]:.4f}" if lr in m["tuning"] else "(not yet)" for lr in LRS)
                     + f" | {m['lr'] or '-'} |")
    head = [f"held-in {label}" for _, label, _ in fields] + [f"unseen {label}" for _, label, _ in fields]
    lines += ["", "### Held-in and unseen tasks at the chosen lr (mean ± sd over seeds)", "",
              "| method | seeds | " + " | ".join(head) + " | trainable | tokens/s | steps |", "|---|" + "---|" * (len(head) + 4)]

    def cell(values, digits: int = 3):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        return f"{statistics.mean(values):.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")

    if base:
        lines.append("| base (zero-shot) | - | " + " | ".join(
            cell([base.get(prefix + key)]) for prefix in ("", "unseen_") for _, _, key in fields) + " | 0 | - | 0 |")
    for method, m in methods.items():
        runs = list(m["runs"].values())
        if not runs:
            continue
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(
            cell([r["results"].get(prefix + key) for r in runs]) for prefix in ("", "unseen_") for _, _, key in fields)
            + f" | {runs[0]['trainable']:,} | {cell([r['tokens_per_s'] for r in runs], 0)} | {runs[0]['steps']} |")
    reference = methods.get("lora r=32", {}).get("runs", {})
    lines += ["", "### Paired differences against LoRA r=32 (95% interval: bootstrap over tasks, and seeds within a task)",
              "", "| method | tasks | " + " | ".join(f"Δ {label}" for _, label, _ in fields) + " | claim |", "|---|" + "---|" * (len(fields) + 2)]
    for method, m in [("base (zero-shot)", {"runs": base_runs})] + list(methods.items()):
        if method == "lora r=32" or not m["runs"] or not reference:
            continue
        mine = m["runs"] if method != "base (zero-shot)" else {s: base_runs["0"] for s in reference}
        for unseen in (False, True):
            results = next(iter(reference.values()))["results"]["tasks"]
            tasks = [t for t, e in results.items() if e.get("unseen", False) == unseen and e.get("n")]
            if not tasks:
                continue
            cells, claims = [], []
            for field, label, _ in fields:
                found = paired_bootstrap(mine, reference, field, tasks)
                if found is None:
                    cells.append("-")
                    continue
                mean, low, high = found
                cells.append(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]")
                if low > 0 or high < 0:
                    good = (mean < 0) == label.endswith("NLL")
                    claims.append(f"{label} {'better' if good else 'worse'}")
            lines.append(f"| {method} ({'unseen' if unseen else 'held-in'}) | {len(tasks)} | " + " | ".join(cells)
                         + f" | {', '.join(claims) or 'no difference shown'} |")
    hours = sum(m["seconds"] for m in methods.values()) / 3600
    lines += ["", f"CPU time of the finished jobs: {hours:.1f} h of wall time on 2 cores (train, tune and eval steps; "
              "the base model's evaluation not included)."]
    plot = tuning_plot(methods, metric, docs / "tuning.png")
    if plot:
        lines += ["", f"![tuning curves](studies/{name}/tuning.png)"]
    text = doc.read_text() if doc.is_file() else "<!-- study:begin -->\n<!-- study:end -->\n"
    start, end = text.index("<!-- study:begin -->"), text.index("<!-- study:end -->")
    doc.write_text(text[:start] + "<!-- study:begin -->\n" + "\n".join(lines) + "\n" + text[end:])
    print("\n".join(lines))


def tuning_plot(methods: dict, metric: str, path: Path) -> bool:
    from rexft.sweep import plot_metric_vs_lr

    curves = {m: {float(lr): v for lr, v in r["tuning"].items()} for m, r in methods.items() if len(r["tuning"]) > 1}
    if curves:
        plot_metric_vs_lr(curves, f"tuning split: {metric}", path)
    return bool(curves)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("run", "collect", "report"))
    parser.add_argument("--study", choices=tuple(STUDIES), default="sni")
    parser.add_argument("--root", default=os.environ.get("REXFT_STUDY_ROOT", str(REPO / "runs" / "study")),
                        help="where the run directories go (the weights; docs/studies/ keeps the records)")
    parser.add_argument("--methods", nargs="*", choices=tuple(METHODS), default=None)
    parser.add_argument("--override", nargs="*", default=[], help="extra key=value for every command (smoke tests)")
    parser.add_argument("--docs", default=str(REPO / "docs" / "studies"), help="where the jobs' records are kept")
    parser.add_argument("--out", default=None, help="the report (default: the study's doc under docs/)")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    elif args.command == "collect":
        collect_all(args)
    else:
        report(args.study, Path(args.docs) / args.study, Path(args.out or REPO / STUDIES[args.study]["doc"]))


if __name__ == "__main__":
    main()
