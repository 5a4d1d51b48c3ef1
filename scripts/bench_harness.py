"""rexft eval vs lm-evaluation-harness on the same examples, both prompt styles, base model and adapter.

    python scripts/bench_harness.py runs/demo --recipe demo --limit 8 --out docs/harness_demo.json

For each prompt style (chat, harness) and model (base: eval.use_adapter=false / use_adapter=false; adapter):
  rexft eval   the run's eval slice (data.eval_per_task, then eval.limit per task), eval.protocol=loglik,
               data.max_length=4096 (lm-eval never trims a passage)       == rexft eval recipe=R run_dir=RUN ...
  lm-eval      the same records, written to a data folder of their own, through the ``rexft`` model:
               tasks rexft_<task> (harness) or rexft_chat (chat, --apply_chat_template)
                                                                         == rexft harness --local_dir DIR ...
and per example: do both pick the same option, and how far apart are the options' log-likelihoods. In the
chat style lm-eval moves the context's trailing "\n" (the assistant header's) into every continuation, so
its log-likelihoods are rexft's plus log p("\n" | header): one shift per example, the same for every option;
the check there is that the shift is the same for all options (its spread), and its size is reported.
winogrande differs by definition in the harness style (lm-eval scores it partially) and is reported apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from rexft.modeling import machine_summary

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rexft_eval(recipe: str, run_dir: Path, style: str, use_adapter: bool, limit: int | None, batch_size: int):
    from rexft.cli import compose
    from rexft.eval.stage import evaluate
    from rexft.rundir import read_jsonl

    overrides = [f"recipe={recipe}", f"run_dir={run_dir}", f"data.prompt_style={style}", "eval.protocol=loglik",
                 f"eval.use_adapter={str(use_adapter).lower()}", f"eval.output=harness-bench/{style}-{'adapter' if use_adapter else 'base'}",
                 "data.max_length=4096", f"eval.batch_size={batch_size}"] + ([f"eval.limit={limit}"] if limit else [])
    cfg, _ = compose(overrides)
    started = time.perf_counter()
    out = evaluate(cfg)
    return read_jsonl(out / "predictions.jsonl"), time.perf_counter() - started, "rexft eval " + " ".join(overrides)


def scored_records(recipe: str, run_dir: Path, limit: int | None, out: Path) -> dict[str, list[int]]:
    """Write the records rexft eval scores (the run's eval slice; the same rows in both styles) to
    out/<task>/validation.jsonl; the row ids per task, in file order."""
    from rexft.cli import compose
    from rexft.eval.stage import eval_examples
    from rexft.rundir import read_jsonl

    cfg, _ = compose([f"recipe={recipe}", f"run_dir={run_dir}"] + ([f"eval.limit={limit}"] if limit else []))
    ids: dict[str, list[int]] = {}
    for example in eval_examples(cfg).examples:
        ids.setdefault(example.task, []).append(example.row)
    for task, rows in ids.items():
        records = read_jsonl(Path(cfg.data.local_dir) / task / "validation.jsonl")
        (out / task).mkdir(parents=True, exist_ok=True)
        (out / task / "validation.jsonl").write_text("".join(json.dumps(records[i]) + "\n" for i in rows))
    return ids


def lm_eval_scores(lm, style: str, tasks: list[str], manager) -> tuple[dict, float]:
    """(task, position in the scored file) -> the options' log-likelihoods, and the seconds it took."""
    import lm_eval

    names = [f"rexft_chat_{t}" if style == "chat" else f"rexft_{t}" for t in tasks]
    started = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, apply_chat_template=style == "chat",
                                  log_samples=True, bootstrap_iters=0)
    scores = {(task, s["doc_id"]): [float(r[0][0]) for r in s["resps"]]
              for task, name in zip(tasks, names) for s in out["samples"][name]}
    return scores, time.perf_counter() - started


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def compare(predictions: list[dict], ids: dict[str, list[int]], theirs: dict, style: str) -> dict[str, dict]:
    """Per task: n, correct (rexft, lm-eval), same choices, and the log-likelihood gaps."""
    from rexft.tasks.common import LETTERS

    position = {task: {row: i for i, row in enumerate(rows)} for task, rows in ids.items()}
    out: dict[str, dict] = {}
    for p in predictions:
        if p.get("dropped"):
            continue
        lm = theirs[(p["task"], position[p["task"]][p["id"]])]
        gold = LETTERS.index(p["gold"])
        shifts = [a - b for a, b in zip(lm, p["scores"])]
        entry = out.setdefault(p["task"], {"n": 0, "rexft": 0, "lm_eval": 0, "same": 0, "max_gap": 0.0, "max_spread": 0.0})
        entry["n"] += 1
        entry["rexft"] += argmax(p["scores"]) == gold
        entry["lm_eval"] += argmax(lm) == gold
        entry["same"] += argmax(p["scores"]) == argmax(lm)
        entry["max_gap"] = max(entry["max_gap"], max(abs(s) for s in shifts))
        entry["max_spread"] = max(entry["max_spread"], max(shifts) - min(shifts))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, nargs="?")
    parser.add_argument("--tables", nargs="+", default=None, help="print the tables of these --out files and exit")
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--limit", type=int, default=None, help="examples per task (eval.limit; default: the run's eval slice)")
    parser.add_argument("--styles", default="harness,chat")
    parser.add_argument("--models", default="base,adapter")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    print(machine_summary(), flush=True)  # what the figures below depend on

    if args.tables:  # print the tables of runs written before (e.g. base and adapter run apart)
        reports = [json.loads(Path(p).read_text()) for p in args.tables]
        print(tables({"results": {k: v for r in reports for k, v in r["results"].items()}}))
        return

    from lm_eval.tasks import TaskManager

    from rexft.harness import RexftLM, task_dir_for

    results, commands = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-harness-") as tmp:
        scored = Path(tmp) / "scored"
        ids = scored_records(args.recipe, args.run_dir, args.limit, scored)
        manager = TaskManager(include_path=str(task_dir_for(scored, Path(tmp) / "tasks")), include_defaults=False)
        for model in args.models.split(","):
            lm = RexftLM(run_dir=str(args.run_dir), use_adapter=model == "adapter", batch_size=args.batch_size)
            for style in args.styles.split(","):
                predictions, rexft_s, command = rexft_eval(args.recipe, args.run_dir, style, model == "adapter", args.limit,
                                                           args.batch_size)
                theirs, lm_s = lm_eval_scores(lm, style, list(ids), manager)
                key = f"{style}/{model}"
                results[key] = {"tasks": compare(predictions, ids, theirs, style),
                                "seconds": {"rexft_eval": round(rexft_s, 1), "lm_eval": round(lm_s, 1)}}
                commands[key] = [command, f"rexft harness --local_dir SCORED --model rexft --model_args run_dir={args.run_dir}"
                                 f"{'' if model == 'adapter' else ',use_adapter=false'} --tasks "
                                 f"{'rexft_chat --apply_chat_template' if style == 'chat' else 'rexft_harness'} "
                                 f"--batch_size {args.batch_size}"]
                print(json.dumps({key: results[key]["seconds"]}), flush=True)
                if args.out:  # as it goes: a long run leaves what it has
                    args.out.write_text(json.dumps({"run_dir": str(args.run_dir), "limit": args.limit, "results": results,
                                                    "commands": commands}, indent=1) + "\n")
    report = {"run_dir": str(args.run_dir), "limit": args.limit, "results": results, "commands": commands}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(tables(report))


def tables(report: dict) -> str:
    """One markdown table per prompt style: accuracy with 95% Wilson intervals, agreement, log-likelihood gaps."""
    from rexft.metrics import wilson

    def cell(k: int, n: int) -> str:
        low, high = wilson(k, n)
        return f"{k / n:.3f} ({low:.2f}-{high:.2f})"

    blocks = []
    styles = sorted({key.split("/")[0] for key in report["results"]}, reverse=True)
    for style in styles:
        models = [m for m in ("base", "adapter") if f"{style}/{m}" in report["results"]]
        gap = ("max spread of the per-example shift (max shift) (nats)" if style == "chat"
               else "max \\|Δ log-lik\\| (nats)")
        head = "| task | n | " + " | ".join(f"{m}: rexft eval | {m}: lm-eval | {m}: same choice" for m in models) + f" | {gap} |"
        lines = [f"**{style} style**", "", head, "|" + "---|" * (3 + 3 * len(models))]
        tasks = report["results"][f"{style}/{models[0]}"]["tasks"]
        totals = {m: [0, 0, 0, 0] for m in models}
        same_prompts = {m: [0, 0, 0, 0] for m in models}  # harness style: winogrande's prompts differ by definition
        for task in sorted(tasks):
            row = [task, str(tasks[task]["n"])]
            spread = gap_size = 0.0
            for m in models:
                e = report["results"][f"{style}/{m}"]["tasks"][task]
                row += [cell(e["rexft"], e["n"]), cell(e["lm_eval"], e["n"]), f"{e['same']}/{e['n']}"]
                spread, gap_size = max(spread, e["max_spread"]), max(gap_size, e["max_gap"])
                for i, key in enumerate(("n", "rexft", "lm_eval", "same")):
                    totals[m][i] += e[key]
                    same_prompts[m][i] += e[key] if style == "chat" or task != "winogrande" else 0
            if style == "chat":
                row.append(f"{spread:.4f} ({gap_size:.4f})")
            else:
                row.append(f"{gap_size:.4f}" + (" (lm-eval scores it partially)" if task == "winogrande" else ""))
            lines.append("| " + " | ".join(row) + " |")
        for label, sums in (("all", totals),) + ((("the 13 with the same prompts", same_prompts),) if style == "harness" else ()):
            lines.append(f"| **{label}** | {sums[models[0]][0]} | " + " | ".join(
                f"{cell(t[1], t[0])} | {cell(t[2], t[0])} | {t[3]}/{t[0]}" for t in sums.values()) + " | |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


if __name__ == "__main__":
    main()
