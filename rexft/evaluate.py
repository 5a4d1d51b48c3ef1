"""Eval stage: accuracy on the validation sets, one forward per batch (no generate() loop).

Protocols
    first_token  the T-REX study's: the next-token distribution after the prompt, argmax over the option
                 letters' tokens (``eval.restricted=true``) or over the whole vocabulary (false; a
                 non-letter prediction counts as wrong). Also reports the gold letter's NLL.
    loglik       lm-evaluation-harness style: sum of log p(option text | prompt) per option; accuracy
                 raw and length-normalised (per byte of the option text).

Batches are length-sorted and left-padded with explicit position ids, so each row computes exactly what
it would alone, and only the last positions' logits are materialised.

``rexft eval`` writes run_dir/eval/: results.json, predictions.jsonl, results.md, and for mixture
adapters routing.png (mean routing weight per task x expert at one layer).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rexft.adapters import adapter_layers, load_adapter, read_adapter_config, set_prior, set_token_mask
from rexft.config import RunConfig
from rexft.data import PromptFormat, cap_examples, build_splits, encode_prompt, letter_token_ids
from rexft.errors import RexftError
from rexft.modeling import load_model, load_tokenizer
from rexft.tasks.common import LETTERS, Example

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- batching
def left_pad(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, width - len(seq):] = torch.tensor(seq)
        mask[i, width - len(seq):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}


def last_logprobs(model, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
    """log-softmax of the logits at the last ``keep`` positions: (b, keep, V), float32."""
    try:
        logits = model(**batch, logits_to_keep=keep, use_cache=False).logits
    except TypeError:  # models without logits_to_keep
        logits = model(**batch, use_cache=False).logits
    return logits[:, -keep:].float().log_softmax(-1)


@dataclass
class Scorer:
    """Scores examples with one model; ``priors`` (n, k) is aligned with the examples scored."""

    model: torch.nn.Module
    tokenizer: object
    fmt: PromptFormat
    max_length: int
    batch_size: int = 16
    priors: torch.Tensor | None = None
    progress: bool = True

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _batches(self, lengths: list[int]):
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        for start in range(0, len(order), self.batch_size):
            yield order[start:start + self.batch_size]

    def _forward(self, sequences: list[list[int]], rows: list[int], keep: int) -> torch.Tensor:
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = {k: v.to(self.device) for k, v in left_pad(sequences, pad_id).items()}
        set_prior(self.model, None if self.priors is None else self.priors[rows].to(self.device))
        set_token_mask(self.model, batch["attention_mask"])
        return last_logprobs(self.model, batch, keep)

    @torch.inference_mode()
    def first_token(self, examples: list[Example], restricted: bool = True, on_batch=None) -> list[dict]:
        from tqdm.auto import tqdm

        max_options = max(len(e.options) for e in examples)
        prefix, letter_ids = letter_token_ids(self.tokenizer, self.fmt, max_options)
        prompts = [encode_prompt(e, self.tokenizer, self.fmt, self.max_length, reserve=len(prefix) + 2)[0] + prefix
                   for e in examples]
        results: list[dict | None] = [None] * len(examples)
        for index in tqdm(list(self._batches([len(p) for p in prompts])), desc="eval", disable=not self.progress, leave=False):
            logprobs = self._forward([prompts[i] for i in index], index, 1)[:, -1]  # (b, V)
            if on_batch:
                on_batch(index)
            for row, i in enumerate(index):
                example = examples[i]
                ids = letter_ids[: len(example.options)]
                scores = logprobs[row, ids]
                if restricted:
                    predicted = LETTERS[int(scores.argmax())]
                else:
                    top = int(logprobs[row].argmax())
                    predicted = LETTERS[ids.index(top)] if top in ids else None
                results[i] = {"task": example.task, "id": example.row, "gold": example.answer, "predicted": predicted,
                              "scores": [round(float(s), 5) for s in scores],
                              "nll": round(-float(scores[example.answer_index]), 5)}
        return results

    @torch.inference_mode()
    def loglik(self, examples: list[Example], on_batch=None) -> list[dict]:
        from tqdm.auto import tqdm

        pairs = []  # (example index, option index, context ids, continuation ids)
        for i, example in enumerate(examples):
            options = [self.tokenizer(self.fmt.answer_text(text), add_special_tokens=False).input_ids for text in example.options]
            longest = max(len(o) for o in options)
            context = encode_prompt(example, self.tokenizer, self.fmt, self.max_length, reserve=longest)[0]
            pairs += [(i, j, context, option) for j, option in enumerate(options)]
        sums = [[0.0] * len(e.options) for e in examples]
        for index in tqdm(list(self._batches([len(p[2]) + len(p[3]) for p in pairs])), desc="eval", disable=not self.progress, leave=False):
            chunk = [pairs[k] for k in index]
            keep = max(len(p[3]) for p in chunk) + 1
            logprobs = self._forward([p[2] + p[3] for p in chunk], [p[0] for p in chunk], keep)
            if on_batch:
                on_batch([p[0] for p in chunk])
            for row, (i, j, _, option) in enumerate(chunk):
                n = len(option)
                # positions -n-1 .. -2 predict the option's tokens
                predicted = logprobs[row, keep - n - 1: keep - 1]  # (n, V)
                sums[i][j] = float(predicted.gather(-1, torch.tensor(option, device=predicted.device)[:, None]).sum())
        results = []
        for example, scores in zip(examples, sums):
            normed = [s / max(1, len(o.encode())) for s, o in zip(scores, example.options)]
            results.append({"task": example.task, "id": example.row, "gold": example.answer,
                            "predicted": LETTERS[max(range(len(scores)), key=scores.__getitem__)],
                            "predicted_norm": LETTERS[max(range(len(normed)), key=normed.__getitem__)],
                            "scores": [round(s, 5) for s in scores],
                            "nll": round(-scores[example.answer_index] / max(1, len(example.options[example.answer_index].encode())), 5)})
        return results


# ----------------------------------------------------------------------------------------------- metrics
def wilson(correct: int, n: int, z: float = 1.96) -> list[float]:
    if n == 0:
        return [0.0, 0.0]
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(centre - half, 4), round(centre + half, 4)]


def summarize(predictions: list[dict], tasks: list[str]) -> dict:
    out = {"tasks": {}}
    for task in tasks:
        rows = [p for p in predictions if p["task"] == task]
        correct = sum(p["predicted"] == p["gold"] for p in rows)
        entry = {"accuracy": round(correct / len(rows), 4) if rows else None, "n": len(rows), "ci95": wilson(correct, len(rows)),
                 "nll": round(sum(p["nll"] for p in rows) / len(rows), 4) if rows else None}
        if rows and "predicted_norm" in rows[0]:
            entry["accuracy_norm"] = round(sum(p["predicted_norm"] == p["gold"] for p in rows) / len(rows), 4)
        out["tasks"][task] = entry
    scored = [t for t in out["tasks"].values() if t["n"]]
    out["mean_accuracy"] = round(sum(t["accuracy"] for t in scored) / len(scored), 4) if scored else None
    out["mean_nll"] = round(sum(t["nll"] for t in scored) / len(scored), 4) if scored else None
    return out


def results_table(results: dict) -> str:
    lines = ["| task | n | accuracy | 95% CI | answer NLL |", "|---|---|---|---|---|"]
    for task, r in results["tasks"].items():
        lines.append(f"| {task} | {r['n']} | {r['accuracy']:.3f} | {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f} | {r['nll']:.3f} |")
    lines.append(f"| **mean** | {sum(r['n'] for r in results['tasks'].values())} | **{results['mean_accuracy']:.3f}** | | {results['mean_nll']:.3f} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- stage
def eval_examples(cfg: RunConfig) -> tuple[list[Example], dict[str, str]]:
    tasks = cfg.eval.tasks or cfg.data.tasks
    examples, sources = [], {}
    for split in build_splits(cfg.data, tasks):
        chosen = cap_examples(split.eval, cfg.eval.limit, cfg.data.seed + 2, split.task)
        examples += chosen
        sources[split.task] = "validation" if split.train_source in ("train", "none") else "validation rows held out from training"
    return examples, sources


def load_eval_model(cfg: RunConfig):
    """(model, tokenizer, adapter config or None, description). A merged export, or base [+ adapter]."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.eval.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(cfg.eval.model)
        if not (path / "config.json").is_file():
            raise RexftError(f"eval.model={path} is not a model directory (no config.json)")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).to(device)
        return model.eval(), tokenizer, None, f"merged model {path}"
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, len(tokenizer), device)
    adapter_dir = cfg.path / "adapter"
    if not cfg.eval.use_adapter:
        return model.eval(), tokenizer, None, f"base model {cfg.model.name_or_path}"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise RexftError(f"no adapter at {adapter_dir}: run `rexft train` with this recipe first, "
                         "or pass eval.use_adapter=false to evaluate the base model")
    load_adapter(model, adapter_dir)
    return model.to(device).eval(), tokenizer, read_adapter_config(adapter_dir), f"adapter {adapter_dir}"


def adapter_priors(adapter_dir: Path, adapter_config: dict, prompts: list[str], cfg: RunConfig) -> torch.Tensor | None:
    """Priors for eval prompts from the centroids saved with the adapter (None if it takes none)."""
    from safetensors.torch import load_file

    from rexft.prior import priors_from

    spec = adapter_config["adapter"]
    if spec["type"] != "trex" or not spec["use_prior"]:
        return None
    meta = adapter_config.get("prior")
    centroids_path = adapter_dir / "prior_centroids.safetensors"
    if meta is None or not centroids_path.is_file():
        raise RexftError(f"adapter at {adapter_dir} uses a prior but carries no prior_centroids.safetensors")
    return priors_from(prompts, load_file(str(centroids_path))["centroids"], meta, cfg.prior)


def evaluate(cfg: RunConfig) -> Path:
    """``rexft eval``: returns run_dir/eval (or run_dir/<eval.output>)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from rexft.rundir import atomic_write_text, write_json, write_jsonl

    state = PartialState(cpu=not torch.cuda.is_available())
    model, tokenizer, adapter_config, description = load_eval_model(cfg)
    examples, sources = eval_examples(cfg)
    priors = None
    if adapter_config is not None:
        priors = adapter_priors(cfg.path / "adapter", adapter_config, [e.prompt for e in examples], cfg)
    mine = examples[state.process_index::state.num_processes]  # distributed: each process scores a shard
    if priors is not None:
        priors = priors[state.process_index::state.num_processes]
    layer = routing_layer(model, cfg.eval.routing_layer)
    if layer is not None:
        layer[1].route_log = []
    order: list[int] = []
    scorer = Scorer(model, tokenizer, PromptFormat.for_model(tokenizer, cfg.model), cfg.data.max_length,
                    cfg.eval.batch_size, priors, progress=state.is_main_process)
    on_batch = (lambda index: order.extend(index)) if layer is not None else None
    if cfg.eval.protocol == "first_token":
        predictions = scorer.first_token(mine, cfg.eval.restricted, on_batch)
    else:
        predictions = scorer.loglik(mine, on_batch)
    predictions = gather_object(predictions) if state.num_processes > 1 else predictions
    if not state.is_main_process:
        return cfg.path / cfg.eval.output
    tasks = list(dict.fromkeys(e.task for e in examples))
    results = summarize(predictions, tasks)
    results.update({"protocol": cfg.eval.protocol, "restricted": cfg.eval.restricted, "model": description,
                    "eval_source": sources})
    out = cfg.path / cfg.eval.output
    write_json(out / "results.json", results)
    write_jsonl(out / "predictions.jsonl", predictions)
    table = results_table(results)
    atomic_write_text(out / "results.md", f"{description}, protocol {cfg.eval.protocol}\n\n{table}\n")
    if layer is not None and state.num_processes == 1:
        routing_heatmap(layer, order, mine, tasks, out / "routing.png")
    print(f"\n{description} — protocol {cfg.eval.protocol}\n{table}")
    held = [t for t, s in sources.items() if s != "validation"]
    if held:
        print(f"(no train split for {', '.join(held)}: evaluated on validation rows held out from training)")
    return out


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


def routing_heatmap(layer, order: list[int], examples: list[Example], tasks: list[str], path: Path) -> None:
    """Mean routing weight per task x expert, from the per-example routes the layer logged."""
    from rexft.prior import heatmap

    name, module = layer
    routes = torch.cat(module.route_log)  # (n, E) in batch order
    module.route_log = None
    by_task = {t: [] for t in tasks}
    for route, index in zip(routes, order):
        by_task[examples[index].task].append(route)
    matrix = [torch.stack(by_task[t]).mean(0).tolist() for t in tasks if by_task[t]]
    heatmap(matrix, [t for t in tasks if by_task[t]], [str(e) for e in range(routes.shape[1])],
            f"mean routing weight at {name}", path, "task", "expert")


# ------------------------------------------------------------------------------------------------ compare
def compare_runs(run_dirs: list[Path], out: Path | None = None) -> str:
    """``rexft eval compare DIR...``: side-by-side accuracy table, and compare.{md,png} written to the
    runs' common parent folder (or ``out``)."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not run_dirs:
        raise SystemExit("usage: rexft eval compare RUN_DIR [RUN_DIR ...]")
    runs = {}
    for directory in run_dirs:
        path = directory / "results.json" if (directory / "results.json").is_file() else directory / "eval" / "results.json"
        if not path.is_file():
            raise SystemExit(f"rexft: error: no eval results at {directory} (run rexft eval first)")
        runs[str(directory)] = json.loads(path.read_text())
    out = Path(out) if out is not None else Path(os.path.commonpath([str(d.resolve()) for d in run_dirs]))
    tasks = list(dict.fromkeys(t for r in runs.values() for t in r["tasks"]))
    lines = ["| task | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for task in tasks:
        cells = [f"{r['tasks'][task]['accuracy']:.3f}" if task in r["tasks"] else "-" for r in runs.values()]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{r['mean_accuracy']:.3f}**" for r in runs.values()) + " |")
    table = "\n".join(lines)
    print(table)
    fig, ax = plt.subplots(figsize=(max(8, len(tasks) * 0.8), 4))
    width = 0.8 / len(runs)
    for k, (name, r) in enumerate(runs.items()):
        values = [r["tasks"].get(t, {}).get("accuracy") or 0 for t in tasks] + [r["mean_accuracy"]]
        ax.bar([i + k * width for i in range(len(tasks) + 1)], values, width, label=Path(name).name or name)
    ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(tasks) + 1)], tasks + ["mean"], rotation=45, ha="right")
    ax.set_ylabel("accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)
    plt.close(fig)
    (out / "compare.md").write_text(table + "\n")
    print(f"wrote {out / 'compare.md'} and {out / 'compare.png'}")
    return table
