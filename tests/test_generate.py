"""The generate protocol: batched decoding == one example at a time on both engines, stop rules, the prior
at every step, ROUGE-L / exact match, target NLL, padding safe whatever the allocator returns, and mixed /
unseen-task eval through the CLI."""

import json

import pytest
import torch

import rexft
from conftest import randomize_adapters, run_cli, tiny_model
from rexft.config import AdapterConfig, EvalConfig, ModelConfig
from rexft.data import PromptFormat, encode_example
from rexft.eval.protocols import ChoicePrediction, Dropped, GeneratedPrediction, Prompts, generate, target_nll
from rexft.eval.report import summarize
from rexft.inference import RowState, make_engine, prior_state
from rexft.metrics import bootstrap_ci, exact_match, normalize_answer, rouge_l
from rexft.modeling import byte_tokenizer
from rexft.tasks.common import Example

TOK = byte_tokenizer()
FMT = PromptFormat.for_model(TOK, ModelConfig(use_chat_template=False))
PROMPTS = ["Translate: cat", "Say something long about the weather in spring and autumn.", "2+2=", "Name a colour",
           "Write the alphabet backwards, please, all of it.", "Hi", "Reverse: abc", "Once upon a time"]


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)  # the priors the tests draw


def examples() -> list[Example]:
    return [Example("gen", i, prompt, target="reference text", references=["reference text", "other text"])
            for i, prompt in enumerate(PROMPTS)]


def trex_model(eos_like: int | None = None):
    """A tiny LLaMA with a randomised T-REX adapter; with ``eos_like``, EOS takes the logit of that token
    (times 1.001), so rows whose greedy path reaches it stop early and the others run to max_new_tokens."""
    model = randomize_adapters(rexft.inject_adapters(tiny_model(), AdapterConfig(type="trex", prior_dim=8, dropout=0)), scale=0.3)
    if eos_like is not None:
        with torch.no_grad():
            model.lm_head.weight[TOK.eos_token_id] = model.lm_head.weight[eos_like] * 1.001
    return model.eval()


def engine_for(model, priors=None, batch_size=16, engine="pool", rows=None, share_prefixes=True, **profile):
    """An engine for ``model`` whose adapters take ``priors`` (or with the hook ``rows``)."""
    made = make_engine(engine, model, TOK, rows or prior_state(model, priors), batch_size, profile)
    made.share_prefixes = made.share_prefixes and share_prefixes
    return made


def greedy(model, priors, batch_size, decode_batch_size=64, engine="pool", rows=None, data=None, profile=None, **settings):
    cfg = EvalConfig(max_new_tokens=settings.pop("max_new_tokens", 12), decode_batch_size=decode_batch_size, **settings)
    made = engine_for(model, priors, batch_size, engine, rows, **(profile or {}))
    return generate(made, Prompts(TOK, FMT, 512), data or examples(), cfg)


def test_batched_generation_equals_one_example_at_a_time():
    priors = torch.rand(len(PROMPTS), 8)
    model = trex_model()
    free = greedy(model, priors, 1)
    # a token some rows generate mid-way: made EOS's twin, it stops those rows early
    counts = {}
    for i, example in enumerate(examples()):
        ids = torch.tensor([encode_example(example, TOK, FMT, 512)["input_ids"][:-len(" reference text") - 1]])
        rexft.set_prior(model, priors[i:i + 1])
        new = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        for token in set(new[3:9]) - {TOK.eos_token_id}:
            counts[token] = counts.get(token, 0) + 1
    token = max((t for t in counts if counts[t] < len(PROMPTS)), key=counts.get)
    stopping = trex_model(eos_like=token)
    single = greedy(stopping, priors, 1, decode_batch_size=1)
    batched = greedy(stopping, priors, 8)
    assert [r.prediction for r in batched] == [r.prediction for r in single]
    # rows join the decoding batch as others finish (2 prefilled at a time, up to 3 decoding): same text
    joining = greedy(stopping, priors, 2, decode_batch_size=3)
    assert [r.prediction for r in joining] == [r.prediction for r in single]
    assert all(f.prediction.startswith(s.prediction) for s, f in zip(single, free))
    assert any(len(s.prediction) < len(f.prediction) for s, f in zip(single, free))  # stopped at EOS
    assert any(s.prediction == f.prediction for s, f in zip(single, free))  # ran to max_new_tokens
    assert all(isinstance(r, GeneratedPrediction) for r in batched)
    plain = greedy(stopping, priors, 8, engine="plain")  # transformers' own generate() and cache
    assert [r.prediction for r in plain] == [r.prediction for r in single]


def test_a_tasks_shared_instruction_is_computed_once_and_changes_nothing():
    """Prompts of one task open with its instruction: generate() runs that prefix once per batch (with a
    prior-free MoDE adapter) and gets the same text and target NLL as computing every prompt whole."""
    model = randomize_adapters(rexft.inject_adapters(tiny_model(), AdapterConfig(type="mode", r=4, num_experts=3, dropout=0)),
                               scale=0.3).eval()
    instructions = {"opposite": "Definition: give the opposite of the word.\n\nInput: ",
                    "count": "Definition: count the letters of the input, then say them.\nInput: ", "alone": "One of a kind: "}
    words = {"opposite": ["hot", "up", "a long river", "dark"], "count": ["abc", "hello there", "x"], "alone": ["only"]}
    data = [Example(task, i, instructions[task] + word, target="ref " + word) for task in words for i, word in enumerate(words[task])]
    tokens = []
    model.model.embed_tokens.register_forward_hook(lambda module, args, out: tokens.append(args[0].numel()))
    runs = {}
    for share in (False, True):
        for batch_size, decode_batch_size in ((2, 64), (16, 64), (3, 4)):
            tokens.clear()
            rows = greedy(model, None, batch_size, decode_batch_size, data=data, max_new_tokens=6,
                          rows=RowState(lambda ids: None, None if share else "row"))
            runs[share, batch_size] = (rows, sum(tokens))
    reference = runs[False, 2][0]
    for (share, batch_size), (rows, _) in runs.items():
        assert [r.prediction for r in rows] == [r.prediction for r in reference], (share, batch_size)
        assert [r.target_nll for r in rows] == pytest.approx([r.target_nll for r in reference], abs=1e-4)
    assert runs[True, 16][1] < runs[False, 16][1] - 2 * len(instructions["opposite"])  # the instructions ran once


def test_the_head_all_openings_share_runs_once_and_changes_nothing():
    """Every task's instruction opens with the same system text (as a chat template's system turn does):
    prefill runs that head once and each task's opening continues from it; text and target NLL are those of
    whole prompts."""
    model = randomize_adapters(rexft.inject_adapters(tiny_model(), AdapterConfig(type="mode", r=4, num_experts=3, dropout=0)),
                               scale=0.3).eval()
    system = "System: you are a careful assistant; answer briefly and exactly as asked.\n"
    instructions = {"opposite": "Give the opposite of the word: ", "count": "Count the letters, then say them: ",
                    "upper": "Write it in capitals: "}
    words = {"opposite": ["hot", "up", "a long river"], "count": ["abc", "hello there"], "upper": ["only", "b"]}
    data = [Example(task, i, system + instructions[task] + word, target="ref " + word)
            for task in words for i, word in enumerate(words[task])]
    tokens = []
    model.model.embed_tokens.register_forward_hook(lambda module, args, out: tokens.append(args[0].numel()))
    runs = {}
    for share in (False, True):
        tokens.clear()
        runs[share] = (greedy(model, None, 16, data=data, max_new_tokens=6,
                              rows=RowState(lambda ids: None, None if share else "row")), sum(tokens))
    (whole, whole_tokens), (shared, shared_tokens) = runs[False], runs[True]
    assert [r.prediction for r in shared] == [r.prediction for r in whole]
    assert [r.target_nll for r in shared] == pytest.approx([r.target_nll for r in whole], abs=1e-4)
    saved = whole_tokens - shared_tokens
    openings = sum(len(system + instructions[t]) * (len(w) - 1) for t, w in words.items())  # a task's opening once
    assert saved >= openings + (len(words) - 1) * len(system)  # and the system text once, not once per task


def test_a_kept_head_runs_once_for_every_batch_and_changes_nothing():
    """``prefill_prefixes`` with ``heads``: a later batch whose openings share the head kept from an earlier
    one runs only what follows it, and its openings' caches equal those of a batch that runs the head."""
    from rexft.inference import DeviceProfile
    from rexft.inference.prefix import prefill_prefixes

    model = tiny_model().eval()
    head = list(range(5, 7 + DeviceProfile().run_cost))  # long enough that running it once saves a forward's cost
    batches = [[head + [70, 71, 72], head + [80, 81]], [head + [90, 91, 92, 93], head + [60]]]
    tokens, heads = [], {}
    model.model.embed_tokens.register_forward_hook(lambda module, args, out: tokens.append(args[0].numel()))
    with torch.inference_mode():
        prefill_prefixes(model, batches[0], 0, split=True, heads=heads)
        tokens.clear()
        kept = prefill_prefixes(model, batches[1], 0, split=True, heads=heads)
        kept_tokens = sum(tokens)
        tokens.clear()
        alone = prefill_prefixes(model, batches[1], 0, split=True)
    assert list(heads) == [tuple(head)] and sum(tokens) - kept_tokens == len(head)
    for mine, theirs in zip(kept.rows([0, 1]).cache.layers, alone.rows([0, 1]).cache.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)


def test_stop_strings_cut_the_text_and_match_per_example():
    priors = torch.rand(len(PROMPTS), 8)
    model = trex_model()
    free = greedy(model, priors, 8)
    marker = next(r.prediction[3:5] for r in free if len(r.prediction.strip()) > 6)
    single = greedy(model, priors, 1, stop=[marker])
    batched = greedy(model, priors, 8, stop=[marker])
    assert [r.prediction for r in batched] == [r.prediction for r in single]
    for stopped, full in zip(batched, free):
        assert marker not in stopped.prediction
        assert full.prediction.startswith(stopped.prediction)
    assert any(len(s.prediction) < len(f.prediction) for s, f in zip(batched, free))


def test_the_prior_is_set_at_every_decoding_step():
    model = trex_model()
    layer = next(m for m in rexft.adapters.adapter_layers(model).values() if m.is_mixture)
    seen = []
    layer.register_forward_pre_hook(lambda module, args: seen.append(module.prior is not None and module.prior.shape[0]))
    priors = torch.rand(len(PROMPTS), 8)
    greedy(model, priors, 8, num_beams=2)
    assert len(seen) >= 12 and all(seen)  # prefill + every new token saw the prior
    # and it matters at every step: other priors change the generated texts
    a = greedy(model, priors, 8)
    b = greedy(model, torch.rand(len(PROMPTS), 8) * 5, 8)
    assert [r.prediction for r in a] != [r.prediction for r in b]


def test_rouge_l_and_exact_match_on_hand_checkable_strings():
    # LCS("the cat sat", "the cat sat down") = 3 tokens: P = 3/3, R = 3/4, F = 2PR/(P+R) = 6/7
    assert rouge_l("the cat sat", ["the cat sat down"]) == pytest.approx(6 / 7)
    assert rouge_l("The Cats sitting", ["the cat sits"]) == pytest.approx(1.0)  # lower-cased, stemmed: the cat sit
    assert rouge_l("the cats are sitting", ["the cat sits"]) == pytest.approx(6 / 7)  # P = 3/4, R = 1
    assert rouge_l("dog", ["a cat", "the dog"]) == pytest.approx(2 / 3)  # max over references: P=1, R=1/2
    assert rouge_l("", ["anything"]) == 0.0
    assert normalize_answer("  The Answer: is A!  ") == "answer is"
    assert exact_match("the answer", ["Answer."]) == 1.0
    assert exact_match("no", ["yes", "No!"]) == 1.0 and exact_match("nope", ["no"]) == 0.0


def test_intervals_bracket_the_mean_and_macro_averages():
    task_a, task_b = [1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5]
    low, high = bootstrap_ci([task_a])
    assert low <= 0.75 <= high and 0 <= low < high <= 1
    low, high = bootstrap_ci([task_a, task_b])
    assert low <= (0.75 + 1 / 6) / 2 <= high
    assert bootstrap_ci([[0.5] * 10]) == [0.5, 0.5]


def test_target_nll_equals_a_hand_computation():
    model = trex_model()
    priors = torch.rand(3, 8)
    chosen = examples()[:3]
    nlls = target_nll(engine_for(model, priors, 3), Prompts(TOK, FMT, 512), chosen)
    for example, prior, nll in zip(chosen, priors, nlls):
        row = encode_example(example, TOK, FMT, 512)
        rexft.set_prior(model, prior[None])
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([row["input_ids"]])).logits[0].log_softmax(-1)
        target = row["input_ids"][row["prompt_length"]:]  # " reference text" + EOS
        picked = [logprobs[row["prompt_length"] - 1 + j, t] for j, t in enumerate(target)]
        assert nll == pytest.approx(-float(sum(picked)) / len(target), abs=1e-4)
    # the pool takes the target NLL from the pass that fills the prompt cache, the plain engine from a pass of
    # its own, beams too: the same numbers
    for engine in ("pool", "plain"):
        for beams in (1, 2):
            generated = greedy(model, priors, 3, engine=engine, data=chosen, max_new_tokens=4, num_beams=beams)
            assert [row.target_nll for row in generated] == pytest.approx(nlls, abs=1e-4)


def test_summary_reports_generative_and_unseen_tasks_apart():
    rows = [GeneratedPrediction("a", i, "", [], r, e, 1.0) for i, (r, e) in enumerate([(1, 1), (0.5, 0)])]
    rows += [GeneratedPrediction("b", 0, "", [], 0.2, 0.0, 3.0), Dropped("b", 1)]
    rows += [ChoicePrediction("c", 0, "A", "A", [0.0], 0.1)]
    results = summarize(rows, ["a", "b", "c"], unseen={"b"})
    assert results["tasks"]["a"]["rouge_l"] == 0.75 and results["tasks"]["a"]["exact_match"] == 0.5
    assert results["tasks"]["b"]["unseen"] and results["tasks"]["b"]["dropped"] == 1 and results["tasks"]["b"]["n"] == 1
    assert results["mean_rouge_l"] == 0.75 and results["unseen_mean_rouge_l"] == 0.2 and results["mean_accuracy"] == 1.0
    assert results["mean_target_nll"] == 1.0 and results["unseen_mean_target_nll"] == 3.0


@pytest.mark.slow
def test_mixed_and_unseen_eval_through_the_cli(tmp_path, data_dir):
    """Train the smoke model on choice tasks + 4 SNI tasks; eval scores each task with its own protocol and
    the unseen SNI test tasks apart, with priors from the trained centroids; compare reads both kinds."""
    common = ["recipe=smoke", f"run_dir={tmp_path}", f"data.local_dir={data_dir}", "data.tasks=[copa,rte,sni]",
              "data.max_length=1024", "data.train_per_task=8", "data.eval_per_task=3", "eval.max_new_tokens=6",
              "+data.sources.sni={format: instruction, path: sni, task_column: task_name, max_tasks: 4, "
              "columns: {instruction: definition, input: inputs, output: targets}}",
              "+data.sources.sni_test={format: instruction, path: sni, task_column: task_name, max_tasks: 2, "
              "train_split: null, validation_split: test, columns: {instruction: definition, input: inputs, output: targets}}",
              "eval.unseen_tasks=[sni_test]", "trainer.epochs=1"]
    run_cli("train", *common)  # computes the prior it needs first
    result = run_cli("eval", *common)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    kinds = {t: (e["kind"], e["unseen"]) for t, e in results["tasks"].items()}
    assert kinds["copa"] == ("choice", False) and kinds["rte"] == ("choice", False)
    assert sum(k == ("generate", False) for k in kinds.values()) == 4 and sum(k == ("generate", True) for k in kinds.values()) == 2
    assert all(0 <= results[k] <= 1 for k in ("mean_accuracy", "mean_rouge_l", "unseen_mean_rouge_l", "unseen_mean_exact_match"))
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    generated = [p for p in predictions if "prediction" in p]
    assert len(generated) == 4 * 3 + 2 * 3 and all(p["references"] and "target_nll" in p for p in generated)
    assert "unseen generative task" in (tmp_path / "eval" / "results.md").read_text() and "ROUGE-L" in result.stdout
    # two processes, each generating for its shard, give the same predictions and scores as one
    import os
    import subprocess
    import sys

    from conftest import ROOT

    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "rexft", "eval",
                    *common, "eval.output=eval_2proc"], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   check=True, capture_output=True)
    two = {(p["task"], p["id"]): p for p in map(json.loads, (tmp_path / "eval_2proc" / "predictions.jsonl").read_text().splitlines())}
    assert {k: v.get("prediction") for k, v in two.items()} == {(p["task"], p["id"]): p.get("prediction") for p in predictions}
    two_results = json.loads((tmp_path / "eval_2proc" / "results.json").read_text())
    assert two_results["mean_rouge_l"] == results["mean_rouge_l"] and two_results["unseen_mean_rouge_l"] == results["unseen_mean_rouge_l"]
    compare = run_cli("eval", "compare", str(tmp_path / "eval"), str(tmp_path / "eval_2proc"))
    assert "**unseen mean ROUGE-L**" in compare.stdout and "**mean accuracy**" in compare.stdout
    assert (tmp_path / "compare.png").is_file() and "(unseen)" in (tmp_path / "compare.md").read_text()


@pytest.mark.slow
def test_demo_sni_recipe_end_to_end_on_a_tiny_model(tmp_path, data_dir):
    """recipe=demo-sni through the real CLI, with the tiny random model in place of SmolLM2: data ->
    cluster-prior -> train -> eval (held-in and unseen SNI tasks) -> merge-export (per cluster, ROUGE-L fidelity)."""
    common = ["recipe=demo-sni", "model=tiny_llama", "model.tiny.max_position_embeddings=4096", f"run_dir={tmp_path}",
              f"data.local_dir={data_dir}", "data.max_length=3072", "data.sources.sni.max_tasks=4",
              "data.sources.sni_test.max_tasks=2", "data.sources.sni_test.eval_per_task=2", "prior.k=4",
              "adapter.prior_dim=4", "eval.max_new_tokens=4", "trainer.batch_size=4", "trainer.grad_accum=1"]
    data = run_cli("data", *common)
    assert "| **6 generate tasks** |" in data.stdout  # 4 trained and 2 unseen: `rexft data` prepares what eval scores
    assert data.stdout.count("(unseen) |") == 2
    prior = run_cli("cluster-prior", *common)
    assert "purity" in prior.stdout
    run_cli("train", *common)
    run_cli("eval", *common)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert sum(not e["unseen"] for e in results["tasks"].values()) == 4 and sum(e["unseen"] for e in results["tasks"].values()) == 2
    assert results["mean_rouge_l"] is not None and results["unseen_mean_rouge_l"] is not None
    run_cli("merge-export", *common)
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["mode"] == "per_cluster" and manifest["per_cluster"]
    assert "ROUGE-L" in (tmp_path / "export" / "per_cluster" / "fidelity.md").read_text()


def test_score_examples_hands_each_protocol_its_rows_as_indices_of_all_examples():
    """A mixed list: per-row state (e.g. each row's static export) is set with indices into the whole list."""
    from rexft.eval.protocols import score_examples

    mixed = [Example("pick", 0, "Pick one: A. yes B. no", ["yes", "no"], 0), *examples()[:3],
             Example("pick", 1, "Pick again: A. up B. down", ["up", "down"], 1)]
    seen = []
    engine = engine_for(tiny_model(), batch_size=2, rows=RowState(seen.append, "row"))
    score_examples(engine, Prompts(TOK, FMT, 512), mixed, EvalConfig(max_new_tokens=3))
    choice = {0, 4}
    assert all(set(rows) <= choice or not set(rows) & choice for rows in seen)
    assert set().union(*map(set, seen)) == set(range(len(mixed)))


def test_rows_placed_in_a_decoding_batch_decode_as_they_would_alone():
    """A ``DecodeBatch``: rows prefilled apart (one with a shared opening) are placed in its slots, right-aligned
    to the written column (a fresh batch, then free slots), decode greedy tokens equal to generate() on each
    row alone; a row leaves, a longer one forces a rebuild (the columns of padding in every row dropped),
    and the rows go on decoding as they would alone."""
    from rexft.inference import PoolEngine, Row
    from rexft.inference.pool import build

    model = tiny_model().eval()
    engine = PoolEngine(model, TOK, prior_state(model, None))
    prompts = {0: [5, 6, 7, 8, 9, 10], 1: [9, 8, 7], 2: [4, 4, 4, 4], 3: [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7], 4: [5, 6, 7, 1, 2]}
    greedy_alone = {i: model.generate(torch.tensor([p]), max_new_tokens=9, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                    for i, p in prompts.items()}
    argmax = lambda logits: logits.argmax(-1)
    got = {i: [] for i in prompts}

    def decode(batch, steps):
        for slot, tokens in enumerate(batch.decode(model, steps, argmax, call_cost=1)):
            if batch.ids[slot] is not None:
                got[batch.ids[slot]] += tokens

    with torch.inference_mode():
        prefill = lambda ids, shared={}: engine._prefill([Row(i, prompts[i], "g") for i in ids], shared, {}, {})
        (first,) = prefill([0, 1])
        batch = build(model, [first], slots=4, room=12)
        assert batch.ids == [0, 1, None, None] and batch.column == 5  # the widest row's keys: all but its last token
        decode(batch, 3)
        (opened,) = prefill([2, 4], {2: 2, 4: 2})  # an opening of 2 tokens run once, then the rests
        assert batch.fits(opened)
        batch.place(opened)
        assert sorted(batch.ids) == [0, 1, 2, 4]
        decode(batch, 3)
        batch.ids[batch.ids.index(1)] = None  # row 1 leaves
        (longer,) = prefill([3])
        assert not batch.fits(longer)  # 13 keys, wider than the 11 written columns
        batch = build(model, [batch.waiting(), longer], slots=4, room=12)
        assert batch.ids[0] == 3 and batch.column == 13 and batch.rows == 4
        decode(batch, 3)
    for i, tokens in got.items():
        assert tokens == greedy_alone[i][: len(tokens)], i
    assert [len(got[i]) for i in sorted(got)] == [9, 6, 6, 3, 6]


def test_row_groups_are_the_cheapest_split_into_contiguous_groups():
    """Brute force over every split of up to 7 rows into contiguous groups: none costs less."""
    import itertools

    from rexft.inference.pool import row_groups

    generator = torch.Generator().manual_seed(1)
    for _ in range(60):
        n, width, call_cost = int(torch.randint(1, 8, (1,), generator=generator)), 50, int(torch.randint(0, 60, (1,), generator=generator))
        starts = torch.randint(0, width, (n,), generator=generator).tolist()
        cost = lambda groups: sum(call_cost + (b - a) * (width - s) for a, b, s in groups)
        splits = [[(a, b, min(starts[a:b])) for a, b in zip((0,) + cuts, cuts + (n,))]
                  for k in range(n) for cuts in itertools.combinations(range(1, n), k)]
        groups = row_groups(starts, width, call_cost)
        assert [a for a, _, _ in groups] == [0] + [b for _, b, _ in groups[:-1]] and groups[-1][1] == n
        assert all(s == min(starts[a:b]) for a, b, s in groups)
        assert cost(groups) == min(cost(split) for split in splits)


def test_rows_attention_attends_each_group_from_its_first_key_with_the_same_result(monkeypatch):
    """A decoding step's attention in groups of rows (each from its earliest real key to the last written
    one) equals SDPA over the whole padded width; batched greedy text still equals one example at a time
    when every row is its own group; and outside the engine's calls "sdpa" is transformers' own again."""
    import rexft.inference.pool as pool
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    module = type("Attention", (), {"num_key_value_groups": 3, "is_causal": True})()
    starts = [0, 0, 3, 9, 9, 14]
    mask = torch.ones(len(starts), 1, 1, 20, dtype=torch.bool)
    mask[..., 16:] = False  # the room not yet written
    for row, start in enumerate(starts):
        mask[row, ..., :start] = False
    query, key, value = torch.randn(6, 6, 1, 8), torch.randn(6, 2, 20, 8), torch.randn(6, 2, 20, 8)
    groups = pool.row_groups(starts, 16, call_cost=1)  # a group per distinct start
    assert [s for _, _, s in groups] == [0, 3, 9, 14]
    with pool.decode_plan(pool.DecodePlan(groups, 16)):
        grouped = pool.rows_sdpa(module, query, key, value, mask, scaling=0.3)[0]
    whole = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)[0]
    assert torch.allclose(grouped, whole, atol=1e-6)

    priors = torch.rand(len(PROMPTS), 8)
    model = trex_model()
    single = greedy(model, priors, 1, decode_batch_size=1)
    seen = []
    monkeypatch.setattr(pool, "row_groups", lambda *args, _f=pool.row_groups: seen.append(_f(*args)) or seen[-1])
    batched = greedy(model, priors, 8, profile={"call_cost": 1})
    assert max(map(len, seen)) > 2  # rows attended in groups
    assert [r.prediction for r in batched] == [r.prediction for r in single]
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward


def nan_filled(monkeypatch):
    """Fresh memory holds NaN (as stale memory from a GPU's caching allocator might hold anything): every
    floating ``new_empty`` / ``torch.empty`` / ``empty_like``."""
    def nan(make):
        def made(*args, **kwargs):
            out = make(*args, **kwargs)
            return out.fill_(float("nan")) if out.is_floating_point() else out
        return made

    monkeypatch.setattr(torch.Tensor, "new_empty", nan(torch.Tensor.new_empty))
    monkeypatch.setattr(torch, "empty", nan(torch.empty))
    monkeypatch.setattr(torch, "empty_like", nan(torch.empty_like))


def test_the_room_not_yet_written_is_never_read(monkeypatch):
    """A decoding batch's columns beyond the written one hold NaN here: no step reads them (each step writes
    its column, then attends up to it), so batched text still equals one example at a time. Attention over
    the whole width would read the NaN."""
    import rexft.inference.pool as pool

    priors = torch.rand(len(PROMPTS), 8)
    model = trex_model()
    single = [r.prediction for r in greedy(model, priors, 1, decode_batch_size=1)]
    made = pool.DecodeBatch.__init__

    def room_of_nan(batch, model, slots, columns, like, width):
        made(batch, model, slots, columns, like, width)
        for layer in batch.cache.layers:
            layer.keys[:, :, width:], layer.values[:, :, width:] = float("nan"), float("nan")

    monkeypatch.setattr(pool.DecodeBatch, "__init__", room_of_nan)
    assert [r.prediction for r in greedy(model, priors, 8, decode_batch_size=3)] == single

    whole = lambda plan, _f=pool.decode_plan: _f(None)  # no plan: SDPA over every column
    monkeypatch.setattr(pool, "decode_plan", whole)
    assert [r.prediction for r in greedy(model, priors, 8, decode_batch_size=3)] != single


def test_every_protocol_on_both_engines_gives_the_same_text_and_scores_with_nan_filled_memory(monkeypatch):
    """first_token, loglik, generate (greedy, with rows joining; and beams) and target NLL on the plain
    engine and the pool, with per-row priors and without (shared openings): the same text and scores, and
    the same again when every fresh buffer holds NaN."""
    from rexft.eval.protocols import first_token, loglik, score_examples

    choice = [Example("pick", i, f"Question {i}: which is {w}? A. {w} B. not {w} C. neither", [w, f"not {w}", "neither"], i % 3)
              for i, w in enumerate(["warm", "a long word here", "up", "x"])]
    mixed = choice + examples()
    models = {"trex": (trex_model(), torch.rand(len(mixed), 8)),
              "mode": (randomize_adapters(rexft.inject_adapters(tiny_model(), AdapterConfig(type="mode", r=4, num_experts=3, dropout=0)),
                                          scale=0.3).eval(), None)}
    prompts = Prompts(TOK, FMT, 512)

    def everything(model, priors, engine):
        made = lambda: engine_for(model, priors, 3, engine)
        settings = EvalConfig(max_new_tokens=8, decode_batch_size=4)
        return [score_examples(made(), prompts, mixed, settings),
                loglik(made(), prompts, choice), first_token(made(), prompts, choice, restricted=False),
                generate(made(), prompts, examples(), EvalConfig(max_new_tokens=6, num_beams=2)),
                target_nll(made(), prompts, examples())]

    def same(a, b):
        for x, y in zip(a, b):
            if isinstance(x, list):
                same(x, y)
            elif isinstance(x, GeneratedPrediction):
                assert (x.prediction, x.rouge_l) == (y.prediction, y.rouge_l)
                assert x.target_nll == pytest.approx(y.target_nll, abs=1e-4)
            elif isinstance(x, ChoicePrediction):
                assert (x.predicted, x.predicted_norm) == (y.predicted, y.predicted_norm)
                assert x.scores == pytest.approx(y.scores, abs=2e-4)
            else:
                assert x == pytest.approx(y, abs=1e-4)

    for model, priors in models.values():
        plain = everything(model, priors, "plain")
        assert all(isinstance(r, GeneratedPrediction) for r in plain[0][len(choice):])
        same(everything(model, priors, "pool"), plain)
        with monkeypatch.context() as patched:
            nan_filled(patched)
            same(everything(model, priors, "pool"), plain)
            same(everything(model, priors, "plain"), plain)


def test_each_example_logs_one_route_paired_with_its_example():
    """The routing heatmap pairs each logged route with its example (``RouteRecorder``): one route per
    example (openings and decoding steps log none), with rows joining mid-decode, with beams and on the plain
    engine, and the same route for an example whichever way it was batched."""
    from rexft.eval.report import RouteRecorder

    priors = torch.rand(len(PROMPTS), 8)
    model = trex_model()
    layer = next(m for m in rexft.adapters.adapter_layers(model).values() if m.is_mixture)
    runs = []
    for settings in ({"decode_batch_size": 3}, {"num_beams": 2}, {"engine": "plain"}, {"decode_batch_size": 64}):
        recorder = RouteRecorder(layer, prior_state(model, priors))
        greedy(model, priors, 2, rows=recorder, **settings)
        routes, order = recorder.routes()
        assert sorted(order) == list(range(len(PROMPTS))) and routes.shape[0] == len(order)
        runs.append(routes[torch.tensor(order).argsort()])
    assert all(torch.allclose(run, runs[0], atol=1e-5) for run in runs)
    assert layer.route_log is None


def test_caches_that_cannot_be_joined_decode_each_batch_alone(monkeypatch):
    """Sliding-window and other caches whose rows cannot be stacked: each prefilled part decodes on its own
    to its end, with the same text."""
    import rexft.inference.pool

    priors = torch.rand(len(PROMPTS), 8)
    model = trex_model()
    reference = greedy(model, priors, 1, decode_batch_size=1)
    monkeypatch.setattr(rexft.inference.pool, "poolable", lambda model: False)
    alone = greedy(model, priors, 4, decode_batch_size=8)
    assert [r.prediction for r in alone] == [r.prediction for r in reference]


def test_a_text_stream_hands_out_prefixes_of_the_final_text_and_never_a_stop_string():
    """TextStream, fed a row's tokens a few at a time: every text it hands out is a prefix of the row's
    whole text cut at its stop string (the one decode of a finished row), held back while a stop string or a
    multi-byte character may be forming, and the whole of it once the row ends."""
    from rexft.inference import TextStream, new_text
    from rexft.modeling import byte_tokenizer

    tokenizer = byte_tokenizer()
    text = "naïve café — 数据 ends here STOP and more"
    tokens = tokenizer(text, add_special_tokens=False).input_ids
    assert len(tokens) > len(text)  # multi-byte characters span several tokens
    for stop, chunk in (((), 1), (("STOP",), 1), (("STOP",), 3), (("é —", "zzz"), 2)):
        stream, seen = TextStream(tokenizer, stop), []
        for end in range(chunk, len(tokens) + chunk, chunk):
            seen.append(stream.safe(tokens[:end]))
        final = new_text(tokenizer, tokens, stop)
        assert all(final.startswith(part) for part in seen) and seen == sorted(seen, key=len)
        assert "\ufffd" not in "".join(seen)
        assert seen[-1] == final if stop else seen[-1] == text
    eos = tokenizer.eos_token_id
    assert TextStream(tokenizer).safe(tokens[:4] + [eos] + tokens[4:]) == new_text(tokenizer, tokens[:4], ())


def test_a_decoding_run_builds_its_batch_once_wide_enough_for_every_row(monkeypatch):
    """The decoding batch's first build is as wide as the widest row waiting, so a wider row placed after it
    never forces another full-size build (a build after the first only shrinks a draining batch; with the
    first part's width alone, the builds here were 64 slots x 54 columns, then 64 x 280); the text is the
    text of one row at a time."""
    import rexft.inference.pool as pool

    builds = []
    real_build = pool.build

    def build(model, parts, slots, room, wide=0):
        batch = real_build(model, parts, slots, room, wide)
        builds.append((len(batch.ids), batch.cache.layers[0].max_cache_len))
        return batch

    monkeypatch.setattr(pool, "build", build)
    # One prefill batch, two length runs: the run holding the short prompt with the long target prefills (and is
    # placed) first, then the long prompt's run, which is wider than the first run's rows.
    data = [Example("gen", 0, "Hi", target="and then " * 40, references=["x"]),
            Example("gen", 1, "Describe, in order, every step of the long journey home. " * 4, target="ok", references=["y"])]
    priors = torch.rand(len(data), 8)
    model = trex_model()
    batched = greedy(model, priors, 2, data=data)
    (slots, _), rest = builds[0], builds[1:]
    assert all(s < slots for s, _ in rest), builds  # only shrinks after the first
    monkeypatch.undo()
    alone = greedy(model, priors, 1, data=data)
    assert [r.prediction for r in batched] == [r.prediction for r in alone]


def test_the_plain_engine_ends_each_row_at_its_own_limit_and_the_batch_when_all_have():
    """A server's per-row limits on generate(): a row ends at its own max_tokens, or at once when its client is
    gone (limit 0), without changing the other rows; a batch whose rows all reached theirs stops decoding."""
    from rexft.inference import Feed, PlainEngine, Row, Sampling

    model = tiny_model().eval()
    # no row stops at EOS: only the limits end them
    model.lm_head.register_forward_hook(lambda module, args, out: out.index_fill(-1, torch.tensor([TOK.eos_token_id]), -1e9))
    rows = [Row(i, TOK(p)["input_ids"]) for i, p in enumerate(PROMPTS[:4])]
    sampling = Sampling(max_new_tokens=12)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))

    def run(limits: dict[int, int] | None):
        forwards.clear()
        feed = None if limits is None else Feed(arrivals=lambda: [], limit=limits.__getitem__, partial=lambda i, t: None)
        made = {g.id: g.tokens for g in PlainEngine(model, TOK, batch_size=4, feed=feed).generate(rows, sampling)}
        return made, len(forwards)

    free, free_forwards = run(None)
    assert all(len(tokens) == 12 for tokens in free.values()) and free_forwards == 12
    limited, _ = run({0: 3, 1: 0, 2: 12, 3: 7})
    assert limited[2] == free[2]  # a row without a lower limit: the same tokens
    for i, n in ((0, 3), (1, 0), (3, 7)):
        assert limited[i][:n] == free[i][:n] and set(limited[i][max(n, 1):]) <= {TOK.pad_token_id}
    _, short_forwards = run({i: 3 for i in range(4)})
    assert short_forwards == 3  # the prefill and two steps: the batch ended with its rows
