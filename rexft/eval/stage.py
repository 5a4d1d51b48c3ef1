"""``rexft eval``: every task scored with its own protocol (``rexft.eval.protocols``) on the device's engine
(``rexft.inference``), held-in and unseen tasks reported apart (``rexft.eval.report``).

Unseen tasks (``eval.unseen_tasks``, never trained on) get their priors from the trained centroids, as
training examples did. ``rexft eval`` writes run_dir/eval/: results.json, predictions.jsonl, results.md,
and for mixture adapters routing.png (mean routing weight per task x expert at one layer).
"""

from __future__ import annotations

import json
from pathlib import Path

from rexft.config import RunConfig
from rexft.data import PromptFormat
from rexft.eval.protocols import Dropped, Prediction, Prompts, as_row, from_row, score_examples
from rexft.eval.report import RouteRecorder, routing_heatmap, routing_layer, results_table, summarize, summary_lines
from rexft.inference import adapter_priors, load_model_for_inference, make_engine, prior_state
from rexft.modeling import default_device
from rexft.splits import EvalSet, eval_set, examples_digest


def eval_examples(cfg: RunConfig) -> EvalSet:
    """Held-in examples (eval.tasks or all of data.tasks) and unseen-task examples (eval.unseen_tasks), as
    `rexft data` recorded them (rexft/splits.py)."""
    return eval_set(cfg)


def scoring_fingerprint(cfg: RunConfig) -> dict:
    """What an example's score depends on besides the example: the adapter's weights and the scoring
    settings. merge-export reuses ``rexft eval``'s predictions for its fidelity table when these match."""
    import hashlib

    from rexft.adapters import ADAPTER_WEIGHTS

    weights = cfg.path / "adapter" / ADAPTER_WEIGHTS
    return {"adapter_sha256": hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None,
            "model": cfg.model.name_or_path, "max_length": cfg.data.max_length, "protocol": cfg.eval.protocol,
            "restricted": cfg.eval.restricted, "max_new_tokens": cfg.eval.max_new_tokens, "stop": list(cfg.eval.stop),
            "do_sample": cfg.eval.do_sample, "num_beams": cfg.eval.num_beams}


def reusable_predictions(cfg: RunConfig) -> dict[tuple[str, object], Prediction]:
    """``rexft eval``'s predictions of the run's adapter, by (task, id), when they were scored with the
    adapter as it is now and the same settings (greedy decoding only); else none."""
    out = cfg.path / cfg.eval.output
    if cfg.eval.do_sample or not (out / "results.json").is_file() or not (out / "predictions.jsonl").is_file():
        return {}
    if json.loads((out / "results.json").read_text()).get("fingerprint") != scoring_fingerprint(cfg):
        return {}
    rows = [from_row(json.loads(line)) for line in (out / "predictions.jsonl").read_text().splitlines() if line.strip()]
    return {(row.task, row.id): row for row in rows}


def evaluate(cfg: RunConfig) -> Path:
    """``rexft eval``: returns run_dir/eval (or run_dir/<eval.output>)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from rexft.rundir import atomic_write_text, write_json, write_jsonl

    state = PartialState(cpu=default_device() == "cpu")
    chosen = eval_examples(cfg)
    examples, sources, unseen = chosen.examples, chosen.sources, chosen.unseen
    model, tokenizer, adapter_config, description = load_model_for_inference(cfg)
    priors = None
    if adapter_config is not None:
        priors = adapter_priors(cfg.path / "adapter", adapter_config, [e.prompt for e in examples], cfg)
    mine = examples[state.process_index::state.num_processes]  # distributed: each process scores a shard
    if priors is not None:
        priors = priors[state.process_index::state.num_processes]
    rows = prior_state(model, priors)
    layer = routing_layer(model, cfg.eval.routing_layer)
    recorder = RouteRecorder(layer[1], rows) if layer is not None else None
    bar = tqdm(total=len(mine), desc="eval", disable=not state.is_main_process, leave=False)
    engine = make_engine(cfg.eval.engine, model, tokenizer, recorder or rows, cfg.eval.batch_size, cfg.eval.profile,
                         bar.update)
    prompts = Prompts(tokenizer, PromptFormat.for_model(tokenizer, cfg.model), cfg.data.max_length)
    predictions = score_examples(engine, prompts, mine, cfg.eval)
    bar.close()
    predictions = gather_object(predictions) if state.num_processes > 1 else predictions
    if not state.is_main_process:
        return cfg.path / cfg.eval.output
    predictions += [Dropped(e.task, e.row) for e in chosen.not_scored]  # too long for `rexft data`: counted, not scored
    tasks = chosen.tasks
    results = summarize(predictions, tasks, unseen, cfg.eval.bootstrap)
    for task, digest in examples_digest(examples).items():
        results["tasks"][task]["examples"] = digest
    results.update({"protocol": cfg.eval.protocol, "restricted": cfg.eval.restricted, "model": description,
                    "prompt_style": cfg.data.prompt_style,
                    "eval_source": sources, "generation": {"max_new_tokens": cfg.eval.max_new_tokens, "stop": cfg.eval.stop,
                                                           "do_sample": cfg.eval.do_sample, "num_beams": cfg.eval.num_beams}})
    if adapter_config is not None:
        results["fingerprint"] = scoring_fingerprint(cfg)
    out = cfg.path / cfg.eval.output
    write_json(out / "results.json", results)
    write_jsonl(out / "predictions.jsonl", [as_row(p) for p in predictions])
    table = results_table(results)
    protocols = sorted({"generate" if e.kind == "generate" else cfg.eval.protocol for e in examples})
    atomic_write_text(out / "results.md", f"{description}, protocols {', '.join(protocols)}, prompt style "
                      f"{cfg.data.prompt_style}\n\n{table}\n")
    if recorder is not None and state.num_processes == 1:
        routes, order = recorder.routes()
        if routes is not None:
            routing_heatmap(layer[0], routes, order, mine, tasks, out / "routing.png")
    shown = table if len(tasks) <= 30 else f"{summary_lines(results)}\n({len(tasks)} tasks: the per-task table is in {out / 'results.md'})"
    print(f"\n{description} — protocols {', '.join(protocols)}\n{shown}")
    held = sorted(t for t, s in sources.items() if s != "validation")
    if cfg.eval.split == "tuning":
        print("(the tuning split: training rows set aside by `rexft data`, never trained on, not the reported rows)")
    elif held:
        listed = ", ".join(held[:8]) + (f" and {len(held) - 8} more" if len(held) > 8 else "")
        print(f"(evaluated on rows held out from training for {listed}: the tasks have no separate split)")
    return out
