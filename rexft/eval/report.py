"""Eval reports: per-task and mean scores from prediction records, the tables, the routing heatmap, and
``rexft eval compare``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rexft.adapters import adapter_layers
from rexft.errors import RexftError
from rexft.eval.protocols import Dropped, GeneratedPrediction, Prediction
from rexft.metrics import bootstrap_ci, wilson
from rexft.tasks.common import Example

MAX_ROWS = 40  # tasks shown in a heatmap or bar chart before it summarises


def summarize(predictions: list[Prediction], tasks: list[str], unseen: set[str] = frozenset(), resamples: int = 1000) -> dict:
    """Per task: accuracy (choice) or ROUGE-L / exact match / target NLL (generative), with 95% intervals;
    macro means over held-in tasks, and over unseen tasks apart. Dropped examples are counted, not scored."""
    by_task: dict[str, list[Prediction]] = {t: [] for t in tasks}
    for p in predictions:
        by_task[p.task].append(p)
    out = {"tasks": {}}
    for task in tasks:
        rows = [p for p in by_task[task] if not isinstance(p, Dropped)]
        entry: dict = {"n": len(rows), "dropped": len(by_task[task]) - len(rows), "unseen": task in unseen}
        if rows and isinstance(rows[0], GeneratedPrediction):
            entry["kind"] = "generate"
            for metric in ("rouge_l", "exact_match"):
                values = [getattr(p, metric) for p in rows]
                entry[metric] = round(sum(values) / len(values), 4)
                entry[f"{metric}_ci95"] = bootstrap_ci([values], resamples)
            nlls = [p.target_nll for p in rows if p.target_nll is not None]
            entry["target_nll"] = round(sum(nlls) / len(nlls), 4) if nlls else None
        elif rows:
            correct = sum(p.predicted == p.gold for p in rows)
            entry.update({"kind": "choice", "accuracy": round(correct / len(rows), 4), "ci95": wilson(correct, len(rows)),
                          "nll": round(sum(p.nll for p in rows) / len(rows), 4)})
            if rows[0].predicted_norm is not None:
                entry["accuracy_norm"] = round(sum(p.predicted_norm == p.gold for p in rows) / len(rows), 4)
        out["tasks"][task] = entry
    for group, held in (("", False), ("unseen_", True)):
        scored = {t: e for t, e in out["tasks"].items() if e["n"] and e["unseen"] == held}
        choice = [e for e in scored.values() if e["kind"] == "choice"]
        generative = {t: e for t, e in scored.items() if e["kind"] == "generate"}
        if choice or not held:
            out[f"{group}mean_accuracy"] = round(sum(e["accuracy"] for e in choice) / len(choice), 4) if choice else None
            out[f"{group}mean_nll"] = round(sum(e["nll"] for e in choice) / len(choice), 4) if choice else None
        if generative:
            for metric in ("rouge_l", "exact_match"):
                out[f"{group}mean_{metric}"] = round(sum(e[metric] for e in generative.values()) / len(generative), 4)
                groups = [[getattr(p, metric) for p in by_task[t] if not isinstance(p, Dropped)] for t in generative]
                out[f"{group}mean_{metric}_ci95"] = bootstrap_ci(groups, resamples)
            nlls = [e["target_nll"] for e in generative.values() if e["target_nll"] is not None]
            out[f"{group}mean_target_nll"] = round(sum(nlls) / len(nlls), 4) if nlls else None
    return out


def _ci(pair: list[float]) -> str:
    return f"{pair[0]:.3f}-{pair[1]:.3f}"


def results_table(results: dict) -> str:
    """Markdown: choice tasks (accuracy) and generative tasks (ROUGE-L, EM, target NLL), held-in first,
    then unseen tasks, each block sorted by task name with its macro mean."""
    blocks = []
    for held, title in ((False, "held-in"), (True, "unseen")):
        tasks = {t: e for t, e in sorted(results["tasks"].items()) if e["unseen"] == held and e["n"]}
        prefix = "unseen_" if held else ""
        choice = {t: e for t, e in tasks.items() if e["kind"] == "choice"}
        generative = {t: e for t, e in tasks.items() if e["kind"] == "generate"}
        if choice:
            lines = [f"| {title} choice task | n | accuracy | 95% CI | answer NLL |", "|---|---|---|---|---|"]
            lines += [f"| {t} | {e['n']} | {e['accuracy']:.3f} | {_ci(e['ci95'])} | {e['nll']:.3f} |" for t, e in choice.items()]
            lines.append(f"| **mean ({len(choice)} task{'s' * (len(choice) != 1)})** | {sum(e['n'] for e in choice.values())} | "
                         f"**{results[prefix + 'mean_accuracy']:.3f}** | | {results[prefix + 'mean_nll']:.3f} |")
            blocks.append("\n".join(lines))
        if generative:
            lines = [f"| {title} generative task | n | ROUGE-L | 95% CI | exact match | 95% CI | target NLL |",
                     "|---|---|---|---|---|---|---|"]
            lines += [f"| {t} | {e['n']} | {e['rouge_l']:.3f} | {_ci(e['rouge_l_ci95'])} | {e['exact_match']:.3f} | "
                      f"{_ci(e['exact_match_ci95'])} | {e['target_nll']:.3f} |" for t, e in generative.items()]
            lines.append(f"| **mean ({len(generative)} task{'s' * (len(generative) != 1)})** | {sum(e['n'] for e in generative.values())} | "
                         f"**{results[prefix + 'mean_rouge_l']:.3f}** | {_ci(results[prefix + 'mean_rouge_l_ci95'])} | "
                         f"**{results[prefix + 'mean_exact_match']:.3f}** | {_ci(results[prefix + 'mean_exact_match_ci95'])} | "
                         f"{results[prefix + 'mean_target_nll']:.3f} |")
            blocks.append("\n".join(lines))
    dropped = sum(e["dropped"] for e in results["tasks"].values())
    if dropped:
        blocks.append(f"({dropped} examples did not fit data.max_length and were not scored; see results.json)")
    empty = sorted(t for t, e in results["tasks"].items() if not e["n"] and not e["dropped"])
    if empty:
        blocks.append(f"(no held-out rows to score for {', '.join(empty)}: their validation split has none of their rows)")
    return "\n\n".join(blocks)


def summary_lines(results: dict) -> str:
    """The macro means alone: what the console shows when there are too many tasks for a table."""
    keys = [k for k in results if k.startswith(("mean_", "unseen_mean_")) and not k.endswith("_ci95") and results[k] is not None]
    return "\n".join(f"{k}: {results[k]:.4f}" for k in keys)


def routing_layer(model, index: int):
    """(name, layer) of the first mixture adapter in transformer block ``index`` (-1: the last block)."""
    layers = [(n, m) for n, m in adapter_layers(model).items() if m.is_mixture]
    if not layers:
        return None
    blocks = sorted({int(part) for n, _ in layers for part in n.split(".") if part.isdigit()})
    if not blocks:
        return layers[0]
    block = blocks[index] if -len(blocks) <= index < len(blocks) else blocks[-1]
    return next((n, m) for n, m in layers if f".{block}." in f".{n}.")


class RouteRecorder:
    """A per-row state hook (``rexft.inference.RowState``) wrapped to pair each route a layer logs with its
    example: the engines run every forward that logs routes right after setting its rows' state, so the
    routes logged between two calls belong to the rows of the first."""

    def __init__(self, layer, rows):
        self.layer, self.rows, self.varies = layer, rows, rows.varies
        self.order, self.seen, self.last = [], 0, []
        layer.route_log = []

    def set(self, ids: list[int]) -> None:
        self.flush()
        self.last = ids
        self.rows.set(ids)

    def flush(self) -> None:
        logged = len(self.layer.route_log)
        self.order += self.last * (logged - self.seen)
        self.seen = logged

    def routes(self) -> tuple[torch.Tensor | None, list[int]]:
        """(n, E) routes and the example of each; the layer stops logging."""
        self.flush()
        logged, self.layer.route_log = self.layer.route_log, None
        return (torch.cat(logged) if logged else None), self.order


def routing_heatmap(name: str, routes: torch.Tensor, order: list[int], examples: list[Example], tasks: list[str],
                    path: Path) -> None:
    """Mean routing weight per task x expert at layer ``name``, from the per-example routes it logged."""
    from rexft.prior import heatmap

    by_task = {t: [] for t in tasks}
    for route, index in zip(routes, order):
        by_task[examples[index].task].append(route)
    shown = [t for t in tasks if by_task[t]]
    means = {t: torch.stack(by_task[t]).mean(0) for t in shown}
    title = f"mean routing weight at {name}"
    if len(shown) > MAX_ROWS:  # keep it legible: the tasks whose routing departs most from the average
        overall = torch.stack(list(means.values())).mean(0)
        shown = sorted(shown, key=lambda t: -float((means[t] - overall).abs().sum()))[:MAX_ROWS]
        title += f"\n{MAX_ROWS} of {len(means)} tasks: those routed most unlike the mean"
    shown.sort(key=lambda t: (int(means[t].argmax()), t))  # grouped by their favourite expert
    heatmap([means[t].tolist() for t in shown], shown, [str(e) for e in range(routes.shape[1])], title, path, "task", "expert")


# ------------------------------------------------------------------------------------------------ compare
def headline(entry: dict) -> tuple[str, float | None]:
    """The metric a task is compared by: accuracy (choice) or ROUGE-L (generative)."""
    if entry.get("kind") == "generate":
        return "ROUGE-L", entry.get("rouge_l")
    return "accuracy", entry.get("accuracy")


MEAN_LABELS = {"mean_accuracy": "mean accuracy", "mean_rouge_l": "mean ROUGE-L", "mean_exact_match": "mean EM",
               "mean_target_nll": "mean target NLL", "unseen_mean_accuracy": "unseen mean accuracy",
               "unseen_mean_rouge_l": "unseen mean ROUGE-L", "unseen_mean_exact_match": "unseen mean EM",
               "unseen_mean_target_nll": "unseen mean target NLL"}


def compare_runs(run_dirs: list[Path], out: Path | None = None) -> str:
    """``rexft eval compare DIR...``: side-by-side table (accuracy for choice tasks; ROUGE-L, EM and target
    NLL for generative ones; held-in and unseen means apart), and compare.{md,png} written to the runs'
    common parent folder (or ``out``). Past 40 tasks the chart plots each run's per-task scores sorted."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not run_dirs:
        raise RexftError("usage: rexft eval compare RUN_DIR [RUN_DIR ...]")
    runs = {}
    for directory in run_dirs:
        path = directory / "results.json" if (directory / "results.json").is_file() else directory / "eval" / "results.json"
        if not path.is_file():
            raise RexftError(f"no eval results at {directory} (run `rexft eval` first)")
        runs[str(directory)] = json.loads(path.read_text())
    out = Path(out) if out is not None else Path(os.path.commonpath([str(d.resolve()) for d in run_dirs]))
    tasks = sorted(dict.fromkeys(t for r in runs.values() for t in r["tasks"]))

    def cell(r: dict, task: str) -> str:
        entry = r["tasks"].get(task)
        if not entry or not entry.get("n"):
            return "-"
        if entry.get("kind") == "generate":
            return f"{entry['rouge_l']:.3f} / {entry['exact_match']:.3f} / {entry['target_nll']:.3f} (n={entry['n']})"
        return f"{entry['accuracy']:.3f} (n={entry['n']})"

    def differs(task: str) -> bool:
        """The runs scored different examples of the task (other rows, another eval.limit)."""
        scored = [(e.get("n"), e.get("examples")) for e in (r["tasks"].get(task) for r in runs.values()) if e]
        return len(set(scored)) > 1

    lines = ["| task (accuracy, or ROUGE-L / EM / target NLL) | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    lines += [f"| {task}{' (unseen)' if any(r['tasks'].get(task, {}).get('unseen') for r in runs.values()) else ''}"
              f"{' †' if differs(task) else ''} | " + " | ".join(cell(r, task) for r in runs.values()) + " |" for task in tasks]
    means = [k for k in MEAN_LABELS if any(r.get(k) is not None for r in runs.values())]
    footer = [f"| **{MEAN_LABELS[k]}** | " + " | ".join(f"**{r[k]:.3f}**" if r.get(k) is not None else "-" for r in runs.values())
              + " |" for k in means]
    if any(differs(task) for task in tasks):
        footer.append("\n† the runs scored different examples of this task (other held-out rows or eval.limit): "
                      "its scores are not comparable")
    table = "\n".join(lines + footer)
    print(table if len(tasks) <= 30 else "\n".join(lines[:2] + footer) + f"\n({len(tasks)} tasks: see compare.md)")
    fig, ax = plt.subplots(figsize=(max(8, min(len(tasks), MAX_ROWS) * 0.8), 4.5))
    if len(tasks) <= MAX_ROWS:
        width = 0.8 / len(runs)
        for k, (name, r) in enumerate(runs.items()):
            values = [headline(r["tasks"].get(t, {}))[1] or 0 for t in tasks]
            ax.bar([i + k * width for i in range(len(tasks))], values, width, label=Path(name).name or name)
        ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(tasks))], tasks, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("accuracy (choice) / ROUGE-L (generative)")
    else:
        for name, r in runs.items():
            values = sorted(headline(e)[1] or 0 for e in r["tasks"].values() if e.get("n"))
            ax.plot(range(len(values)), values, marker=".", linestyle="-", label=Path(name).name or name)
        ax.set_xlabel(f"tasks, each run sorted by its own score ({len(tasks)} tasks)")
        ax.set_ylabel("accuracy (choice) / ROUGE-L (generative)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)
    plt.close(fig)
    (out / "compare.md").write_text(table + "\n")
    print(f"wrote {out / 'compare.md'} and {out / 'compare.png'}")
    return table
