"""Prompt styles and the lm-evaluation-harness model: chat prompts unchanged, harness prompts exactly lm-eval's,
lm-eval through the ``rexft`` model scoring what ``rexft eval`` scores, with each request's prior."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from rexft.data import PromptFormat, encode_example
from rexft.modeling import byte_tokenizer
from rexft.tasks import task_names

from conftest import validation_examples

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# sha256 over the first 20 validation examples of every task (fields, and token ids in a chat template and
# in the plain template at max_length 256), computed with rexft before prompt styles existed.
CHAT_DIGEST = "63a7de41edeec292eec7d95a6184ab93fb4a540f4d3b82736745ff48b0f1b1a3"
TASKS = ["copa", "rte"]  # the tiny run's tasks: one with a passage, one with lm-eval's doubled delimiter


def test_chat_style_is_unchanged(data_dir):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = TEMPLATE
    digest = hashlib.sha256()
    for task in task_names():
        for example in validation_examples(task, str(data_dir))[:20]:
            fields = example.to_dict()
            assert fields.pop("prompt_style") == "chat"
            assert fields.pop("target") is None
            fields["answer"] = example.letter  # what the digest hashed when the gold letter was named `answer`
            del fields["gold"]
            digest.update(json.dumps(fields, sort_keys=True).encode())
            for fmt in (PromptFormat(True, "{prompt}\nAnswer:"), PromptFormat(False, "{prompt}\nAnswer:")):
                digest.update(json.dumps(encode_example(example, tokenizer, fmt, 256)).encode())
    assert digest.hexdigest() == CHAT_DIGEST


def test_harness_style_trains_on_the_gold_continuation(data_dir):
    tokenizer = byte_tokenizer()
    example = validation_examples("boolq", str(data_dir), "harness")[0]
    assert example.options == [" no", " yes"] and example.prompt.endswith("?\nAnswer:")
    row = encode_example(example, tokenizer, PromptFormat(True, "{prompt}"), 4096)  # a chat model: still plain text
    text = tokenizer.decode(row["input_ids"])
    assert text == f"<s>{example.prompt}{example.options[example.gold]}</s>"
    assert tokenizer.decode(row["input_ids"][row["prompt_length"]:]) == f"{example.options[example.gold]}</s>"


def test_harness_style_needs_loglik():
    from rexft.cli import ConfigError, compose

    with pytest.raises(ConfigError, match="eval.protocol=loglik"):
        compose(["recipe=smoke", "data.prompt_style=harness"])
    compose(["recipe=smoke", "data.prompt_style=harness", "eval.protocol=loglik"])


# ------------------------------------------------------------------------------------------- lm-eval
def task_manager(local_dir: Path, folder: Path):
    from lm_eval.tasks import TaskManager

    from rexft.harness import task_dir_for

    return TaskManager(include_path=str(task_dir_for(local_dir, folder)), include_defaults=False)


def test_harness_prompts_are_lm_evals(data_dir, tmp_path):
    """Every task but winogrande (lm-eval scores it partially: two contexts, one continuation): the context and
    continuations lm-eval builds from the shipped YAMLs are rexft's harness-style prompt and options."""
    pytest.importorskip("lm_eval")
    names = [t for t in task_names() if t != "winogrande"]
    for name in names:  # the first records of each task, in a data folder of their own
        (tmp_path / "data" / name).mkdir(parents=True)
        with open(data_dir / name / "validation.jsonl") as records:
            (tmp_path / "data" / name / "validation.jsonl").write_text("".join(next(records) for _ in range(5)))
    manager = task_manager(tmp_path / "data", tmp_path / "tasks")
    tasks = manager.load([f"rexft_{t}" for t in names])["tasks"]
    for name in names:
        task = tasks[f"rexft_{name}"]
        task.build_all_requests(limit=5)
        examples = validation_examples(name, str(tmp_path / "data"), "harness")
        by_doc: dict[int, list] = {}
        for instance in task.instances:
            by_doc.setdefault(instance.doc_id, []).append(instance)
        for doc_id, instances in by_doc.items():
            example = examples[doc_id]
            contexts = {instance.args[0] for instance in instances}
            assert contexts == {example.prompt}, name
            assert [instance.args[1] for instance in sorted(instances, key=lambda i: i.idx)] == example.options, name
            target, choices = task.doc_to_target(instances[0].doc), task.doc_to_choice(instances[0].doc)
            assert (target if isinstance(target, int) else choices.index(target)) == example.gold, name


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    """A run directory as `rexft train` leaves it: a tiny LLaMA's trex adapter with a prior (random, far from
    zero, so the prior moves every score), its centroids and its config; `rexft eval` scored in harness style;
    and a data folder holding exactly the records it scored, for lm-eval."""
    pytest.importorskip("lm_eval")
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from conftest import randomize_adapters
    from rexft.adapters import inject_adapters, save_adapter
    from rexft.cli import compose
    from rexft.data import prepare_data
    from rexft.eval.stage import evaluate
    from rexft.modeling import load_model, load_tokenizer
    from rexft.rundir import read_jsonl, save_resolved_config

    run = tmp_path_factory.mktemp("run")
    cfg, resolved = compose(["recipe=smoke", f"data.tasks=[{','.join(TASKS)}]", f"run_dir={run}", "data.eval_per_task=4",
                             "data.local_dir=" + str(data_dir), "data.prompt_style=harness", "eval.protocol=loglik",
                             "prior.k=4", "eval.batch_size=3"])
    save_resolved_config(cfg, OmegaConf.to_yaml(resolved), "train")
    model = load_model(cfg.model, len(load_tokenizer(cfg.model)))
    randomize_adapters(inject_adapters(model, cfg.adapter), scale=0.3)
    meta = {"embedder": cfg.prior.embedder, "dim": 384, "k": 4, "max_length": cfg.prior.max_length}
    save_adapter(model, run / "adapter", metadata={"prior": meta})
    centroids = torch.nn.functional.normalize(torch.randn(4, 384, generator=torch.Generator().manual_seed(0)), dim=-1)
    save_file({"centroids": centroids}, str(run / "adapter" / "prior_centroids.safetensors"))
    shutil.copy(run / "config.yaml", run / "adapter" / "config.yaml")
    prepare_data(cfg)  # the frozen split eval scores
    scored = evaluate(cfg)
    assert json.loads((scored / "results.json").read_text())["prompt_style"] == "harness"  # reports state the style
    predictions = read_jsonl(scored / "predictions.jsonl")
    local = run / "scored"
    for task in TASKS:
        records = read_jsonl(data_dir / task / "validation.jsonl")
        (local / task).mkdir(parents=True)
        (local / task / "validation.jsonl").write_text("".join(json.dumps(records[p["id"]]) + "\n"
                                                            for p in predictions if p["task"] == task))
    return run, local, predictions


def lm_eval_scores(lm, local: Path, folder: Path) -> dict[tuple[str, int], list[float]]:
    """Per (task, position in the scored file): lm-eval's log-likelihood of each option."""
    import lm_eval

    out = lm_eval.simple_evaluate(model=lm, tasks=[f"rexft_{t}" for t in TASKS], task_manager=task_manager(local, folder),
                                  log_samples=True, bootstrap_iters=0)
    return {(task, sample["doc_id"]): [float(r[0][0]) for r in sample["resps"]]
            for task in TASKS for sample in out["samples"][f"rexft_{task}"]}


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def test_lm_eval_scores_what_rexft_eval_scores(tiny_run, tmp_path):
    from rexft.harness import RexftLM

    run, local, predictions = tiny_run
    lm = RexftLM(run_dir=str(run), batch_size=3)  # batches mix tasks, rows of one example, and lengths
    scores = lm_eval_scores(lm, local, tmp_path / "tasks")
    position = {task: 0 for task in TASKS}
    for prediction in predictions:
        theirs = scores[(prediction["task"], position[prediction["task"]])]
        position[prediction["task"]] += 1
        assert argmax(theirs) == argmax(prediction["scores"])
        assert theirs == pytest.approx(prediction["scores"], abs=1e-3)
    assert len(lm.priors) == len(predictions)  # one prior per example (its context)


def test_each_request_gets_its_prior(tiny_run, tmp_path):
    """Scores with the right priors differ from scores with every prior swapped for another example's."""
    from rexft.harness import RexftLM

    run, local, _ = tiny_run
    lm = RexftLM(run_dir=str(run), batch_size=3)
    right = lm_eval_scores(lm, local, tmp_path / "right")
    texts = list(lm.priors)
    lm.priors = {text: lm.priors[texts[(i + 1) % len(texts)]] for i, text in enumerate(texts)}  # wrong ones, kept
    wrong = lm_eval_scores(lm, local, tmp_path / "wrong")
    moved = [abs(a - b) for key in right for a, b in zip(right[key], wrong[key])]
    assert max(moved) > 1e-2


def test_generate_and_rolling_set_priors_per_row(tiny_run):
    """generate_until and loglikelihood_rolling batched give what each request gives alone (its own prior)."""
    from lm_eval.api.instance import Instance

    from rexft.harness import RexftLM

    run, _, _ = tiny_run
    texts = ["The cat sat on the mat because", "Question: is the sky blue?\nAnswer:", "A much longer context " * 5]
    results = {}
    for batch_size in (3, 1):
        lm = RexftLM(run_dir=str(run), batch_size=batch_size, max_length=48)  # rolling: several windows per text
        generate = [Instance("generate_until", {}, (t, {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}), i)
                    for i, t in enumerate(texts)]
        rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
        results[batch_size] = (lm.generate_until(generate), lm.loglikelihood_rolling(rolling))
        assert set(lm.priors) == set(texts)
    assert results[3][0] == results[1][0]
    assert results[3][1] == pytest.approx(results[1][1], abs=1e-3)


def test_rexft_harness_command(tiny_run, tmp_path):
    """`rexft harness` is lm-eval's command line with the model and the tasks: the accuracy it reports is
    the one `rexft eval` reported on the same records."""
    from conftest import run_cli

    run, local, predictions = tiny_run
    run_cli("harness", "--local_dir", str(local), "--model", "rexft", "--model_args", f"run_dir={run}",
            "--tasks", "rexft_copa", "--batch_size", "4", "--output_path", str(tmp_path / "out"))
    (results,) = tmp_path.glob("out/**/results_*.json")
    copa = [p for p in predictions if p["task"] == "copa"]
    expected = sum(p["predicted"] == p["gold"] for p in copa) / len(copa)
    assert json.loads(results.read_text())["results"]["rexft_copa"]["acc,none"] == pytest.approx(expected)


def test_chat_style_through_lm_eval(tiny_run, tmp_path):
    """rexft_chat tasks under --apply_chat_template score rexft's chat prompts: the same choices as rexft's
    loglik protocol, and log-likelihoods that differ by one shift per example (lm-eval moves the header's trailing
    newline into every continuation). The prior is computed from the user turn, as rexft computes it: a prior
    from the rendered chat would move the options apart."""
    import lm_eval

    from rexft.adapters import read_adapter_config
    from rexft.eval.protocols import Prompts, loglik
    from rexft.inference import adapter_priors, make_engine, prior_state
    from rexft.rundir import saved_config
    from rexft.harness import RexftLM

    run, local, _ = tiny_run
    lm = RexftLM(run_dir=str(run), batch_size=3)
    # A template that writes its own BOS (as Llama's do): lm-eval adds the tokenizer's BOS to a context that
    # does not start with it, rexft renders chat templates without adding special tokens.
    lm.tokenizer.chat_template = "<s>" + TEMPLATE.replace("<|assistant|>", "<|assistant|>\n")
    out = lm_eval.simple_evaluate(model=lm, tasks=[f"rexft_chat_{t}" for t in TASKS], apply_chat_template=True,
                                  task_manager=task_manager(local, tmp_path / "tasks"), log_samples=True, bootstrap_iters=0)
    examples = [e for task in TASKS for e in validation_examples(task, str(local), "chat")]
    priors = adapter_priors(run / "adapter", read_adapter_config(run / "adapter"), [e.prompt for e in examples],
                            saved_config(run))
    engine = make_engine("auto", lm.model, lm.tokenizer, prior_state(lm.model, priors), 3)
    ours = loglik(engine, Prompts(lm.tokenizer, PromptFormat(True, "{prompt}"), 4096), examples)
    theirs = [[float(r[0][0]) for r in s["resps"]] for task in TASKS for s in out["samples"][f"rexft_chat_{task}"]]
    for mine, lm_eval_scores in zip(ours, theirs):
        shifts = [a - b for a, b in zip(lm_eval_scores, mine.scores)]
        assert argmax(lm_eval_scores) == argmax(mine.scores)
        assert max(shifts) - min(shifts) < 1e-3
        assert max(shifts) < -1e-3  # the newline's own log-probability, now in lm-eval's continuation
