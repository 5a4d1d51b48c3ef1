"""The user's data held to its word (issue 25): no silent wrong labels, a frozen split per run, and one clear
line (file, line as an editor shows it, what to do) for every bad file. Each test failed before the change."""

import json
import logging
from pathlib import Path
from urllib.parse import unquote

import pytest

from conftest import run_cli
from rexft.cli import ConfigError, compose
from rexft.config import DataConfig, ModelConfig, TaskSpec
from rexft.data import IGNORE_INDEX, PromptFormat, encode_example
from rexft.splits import build_splits
from rexft.errors import RexftError
from rexft.modeling import byte_tokenizer

PICK = dict(format="choice", columns={"question": "q", "options": "opts", "answer": "gold"})
WORDS = ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "zeta", "iota")
INSTRUCTION = dict(format="instruction", columns={"instruction": "prompt", "output": "answer"})


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def splits(tmp_path, **specs):
    return build_splits(DataConfig(tasks=list(specs), sources={k: TaskSpec(**v) for k, v in specs.items()},
                                   local_dir=str(tmp_path)))


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("rexft: error: "), result.stderr
    return lines[0]


# ------------------------------------------------------------------------------------ silent wrong results
def test_digit_option_texts_are_read_as_the_answer_format_says(tmp_path):
    jsonl(tmp_path / "n.jsonl", [{"q": "Which is three?", "opts": ["1", "2", "3", "4"], "gold": "3"}] * 4)
    with pytest.raises(RexftError, match=r"n.jsonl line 1: answer '3' is ambiguous: as index D \('4'\), "
                                         r"as text C \('3'\); set answer_format"):
        splits(tmp_path, n=dict(path="n.jsonl", **PICK))
    (as_text,) = splits(tmp_path, n=dict(path="n.jsonl", answer_format="text", **PICK))
    assert {e.letter for e in as_text.train + as_text.eval} == {"C"} and as_text.answers == "text"
    (as_index,) = splits(tmp_path, n=dict(path="n.jsonl", answer_format="index", **PICK))
    assert {e.letter for e in as_index.train + as_index.eval} == {"D"} and as_index.answers == "index"
    jsonl(tmp_path / "l.jsonl", [{"q": "Pick", "opts": ["A", "x"], "gold": "A"}, {"q": "Pick", "opts": ["y", "z"], "gold": 1}])
    (agreeing,) = splits(tmp_path, l=dict(path="l.jsonl", **PICK))  # "A" is letter A and text A: they agree
    assert agreeing.answers == "letter=text, index"
    with pytest.raises(RexftError, match=r"line 2: answer 1 is not a letter A-B \(answer_format: letter\)"):
        splits(tmp_path, l=dict(path="l.jsonl", answer_format="letter", **PICK))


def test_a_recipe_file_named_like_a_built_in_is_the_file_and_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    recipe = tmp_path / "mine" / "smoke.yaml"
    recipe.parent.mkdir()
    recipe.write_text("# @package _global_\nname: my-own-smoke\ndata:\n  tasks: [copa]\n")
    cfg, _ = compose([f"recipe={recipe}"])
    assert cfg.name == "my-own-smoke" and cfg.data.tasks == ["copa"]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_relative_path_in_a_recipe_file_is_found_beside_it_and_a_missing_path_lists_every_place(tmp_path):
    jsonl(tmp_path / "recipes" / "files" / "i.jsonl", [{"prompt": w, "answer": w[::-1]} for w in WORDS])
    recipe = tmp_path / "recipes" / "mine.yaml"
    recipe.write_text("# @package _global_\ndata:\n  tasks: [mine]\n  sources:\n    mine: {format: instruction, "
                      "path: files/i.jsonl, columns: {instruction: prompt, output: answer}}\n")
    cfg, _ = compose([f"recipe={recipe}", f"data.local_dir={tmp_path / 'data'}"])
    assert cfg.data.sources["mine"].path == str(tmp_path / "recipes" / "files" / "i.jsonl")
    with pytest.raises(RexftError) as err:
        splits(tmp_path / "data", mine=dict(path="nowhere/i.jsonl", **INSTRUCTION))
    assert f"looked for {Path.cwd() / 'nowhere/i.jsonl'}, {tmp_path / 'data' / 'nowhere/i.jsonl'}" in str(err.value)
    recipe.write_text(recipe.read_text().replace("files/i.jsonl", "files/gone.jsonl"))
    with pytest.raises(ConfigError) as err:  # set in a recipe file: the recipe's folder is listed too
        compose([f"recipe={recipe}", f"data.local_dir={tmp_path / 'data'}"])
    assert str(err.value) == (f"data.sources.mine: path files/gone.jsonl not found; looked for "
                              f"{Path.cwd() / 'files/gone.jsonl'}, {tmp_path / 'data' / 'files/gone.jsonl'}, "
                              f"{tmp_path / 'recipes' / 'files/gone.jsonl'}")


def test_unknown_exclude_is_an_error_and_task_values_are_stripped_with_a_case_warning(tmp_path, caplog):
    rows = [{"kind": kind, "prompt": w, "answer": w} for kind in ("billing ", " billing", "Billing") for w in WORDS[:3]]
    jsonl(tmp_path / "t.jsonl", rows)
    spec = dict(path="t.jsonl", task_column="kind", **INSTRUCTION)
    with pytest.raises(RexftError, match=r"data.sources.t.exclude names tasks not in column 'kind': \['biling'\]"):
        splits(tmp_path, t=dict(exclude=["biling"], **spec))
    with caplog.at_level(logging.WARNING):
        found = splits(tmp_path, t=spec)
    assert [s.task for s in found] == ["billing", "Billing"] and len(found[0].train + found[0].eval) == 6
    assert "task values 'billing' and 'Billing' differ only by case" in caplog.text


@pytest.mark.parametrize("name", ["val", "dev", "valid", "validation"])
def test_a_split_folder_follows_the_split_names_of_datasets_and_names_unused_files(tmp_path, caplog, name):
    jsonl(tmp_path / "f" / "train.jsonl", [{"prompt": w, "answer": w} for w in WORDS])
    jsonl(tmp_path / "f" / f"{name}.jsonl", [{"prompt": "held", "answer": "out"}])
    jsonl(tmp_path / "f" / "test.jsonl", [{"prompt": "test", "answer": "only"}])
    with caplog.at_level(logging.WARNING):
        (split,) = splits(tmp_path, f=dict(path="f", **INSTRUCTION))
    assert len(split.train) == 10 and [e.prompt for e in split.eval] == ["held"] and split.train_source == "train"
    assert "also holds test.jsonl, which rexft does not read" in caplog.text
    jsonl(tmp_path / "f" / "dev.csv" if name != "dev" else tmp_path / "f" / "val.jsonl", [{"prompt": "x", "answer": "y"}])
    with pytest.raises(RexftError, match="holds 2 files for split 'validation'"):
        splits(tmp_path, f=dict(path="f", **INSTRUCTION))


def test_chat_without_a_template_trains_every_assistant_turn(tmp_path):
    turns = [{"role": "user", "content": "Say one."}, {"role": "assistant", "content": "one!"},
             {"role": "user", "content": "Louder."}, {"role": "assistant", "content": "ONE"}]
    jsonl(tmp_path / "c.jsonl", [{"messages": turns}] * 3)
    (split,) = splits(tmp_path, c=dict(format="chat", path="c.jsonl"))
    tok = byte_tokenizer()
    row = encode_example(split.train[0], tok, PromptFormat.for_model(tok, ModelConfig(use_chat_template=False)), 512)
    assert tok.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == "one! ONE</s>"


def test_task_names_become_safe_reversible_folder_names():
    from rexft.rundir import folder_name

    for task in ("returns/exchanges", "a\\b", "..", ".hidden", "50% off", "plain_name-1"):
        name = folder_name(task)
        assert "/" not in name and "\\" not in name and not name.startswith(".") and unquote(name) == task
    assert folder_name("plain_name-1") == "plain_name-1" and folder_name("returns/exchanges") == "returns%2Fexchanges"


# --------------------------------------------------------------------------------- the frozen split, via the CLI
def prepared(tmp_path, *extra):
    """`rexft data` on a user source with a held-out share; returns the CLI arguments of the run."""
    jsonl(tmp_path / "i.jsonl", [{"prompt": f"Reverse {w} ({i}).", "answer": w[::-1]} for i, w in enumerate(WORDS * 2)])
    args = ["recipe=smoke", f"run_dir={tmp_path / 'run'}", "data.tasks=[mine]", f"data.local_dir={tmp_path}",
            f"+data.sources.mine.path={tmp_path / 'i.jsonl'}", "+data.sources.mine.holdout=0.25",
            "+data.sources.mine.columns={instruction: prompt, output: answer}", *extra]
    run_cli("data", *args)
    return args


def test_eval_scores_the_frozen_held_out_rows_after_the_source_changes(tmp_path, caplog):
    from rexft.prior import data_fingerprint, prior_is_stale, training_texts
    from rexft.splits import eval_set, frozen_mixture

    args = prepared(tmp_path)
    cfg, _ = compose(args)
    held_out = [e.to_dict() for e in eval_set(cfg).examples]
    trained = {e.prompt for e in frozen_mixture(cfg)}
    assert held_out and not trained & {e["prompt"] for e in held_out}
    texts, _ = training_texts(cfg)  # what cluster-prior embeds: the rows train uses
    assert texts == [e.prompt for e in frozen_mixture(cfg)]
    meta = tmp_path / "run" / "prior" / "meta.json"
    meta.parent.mkdir()
    meta.write_text(json.dumps({"data_fingerprint": data_fingerprint(texts[1:])}))
    assert prior_is_stale(cfg)  # clustered from other rows: train runs cluster-prior again
    meta.write_text(json.dumps({"data_fingerprint": data_fingerprint(texts)}))
    assert not prior_is_stale(cfg)
    lines = (tmp_path / "i.jsonl").read_text()
    (tmp_path / "i.jsonl").write_text("".join(json.dumps({"prompt": f"New {i}.", "answer": "x"}) + "\n" for i in range(7)) + lines)
    with caplog.at_level(logging.WARNING):
        again = eval_set(cfg)
    assert [e.to_dict() for e in again.examples] == held_out  # never the rows trained on
    assert f"{tmp_path / 'i.jsonl'} (mine) changed since `rexft data`" in caplog.text
    record = json.loads((tmp_path / "run" / "data" / "split.json").read_text())
    assert sorted(record["tasks"]["mine"]["eval_rows"]) == sorted(e["row"] for e in held_out)
    (tmp_path / "run" / "data" / "split.json").unlink()  # a run directory from before the record
    old = run_cli("eval", *args, check=False)
    assert "made before rexft recorded its split: run `rexft data`" in one_line_error(old)


def test_eval_skips_what_data_dropped_reports_empty_tasks_and_scores_unseen_tasks_on_all_rows(tmp_path):
    from rexft.eval.protocols import Dropped, GeneratedPrediction
    from rexft.eval.report import results_table, summarize
    from rexft.splits import eval_set

    jsonl(tmp_path / "other.jsonl", [{"prompt": f"Copy {w}.", "answer": w} for w in WORDS])
    jsonl(tmp_path / "f" / "train.jsonl", [{"kind": k, "prompt": w, "answer": w} for k in ("a", "b") for w in WORDS])
    jsonl(tmp_path / "f" / "validation.jsonl", [{"kind": "a", "prompt": "held", "answer": "out"},
                                                {"kind": "a", "prompt": "long " * 300, "answer": "gnol"}])
    args = prepared(tmp_path, "data.max_length=256", "data.eval_per_task=null", "data.train_per_task=null",
                    "data.tasks=[mine,split]", "eval.unseen_tasks=[other]",
                    f"+data.sources.other.path={tmp_path / 'other.jsonl'}",
                    "+data.sources.other.columns={instruction: prompt, output: answer}",
                    f"+data.sources.split.path={tmp_path / 'f'}", "+data.sources.split.task_column=kind",
                    "+data.sources.split.columns={instruction: prompt, output: answer}")
    cfg, _ = compose(args)
    chosen = eval_set(cfg)
    stats = json.loads((tmp_path / "run" / "data" / "stats.json").read_text())
    assert [(e.task, e.row) for e in chosen.not_scored] == [("a", 1)] and stats["tasks"]["a"]["dropped"] == 1
    assert [(e.task, e.row) for e in chosen.examples if e.task in "ab"] == [("a", 0)]
    assert sorted(e.row for e in chosen.examples if e.task == "other") == list(range(10))  # unseen: all its rows
    assert chosen.unseen == {"other"} and chosen.tasks == ["mine", "a", "b", "other"]
    scored = [GeneratedPrediction(e.task, e.row, e.target, [e.target], 1.0, 1.0, 0.5) for e in chosen.examples]
    results = summarize(scored + [Dropped("a", 1)], chosen.tasks, chosen.unseen)
    assert results["tasks"]["a"]["n"] == 1 and results["tasks"]["b"]["n"] == 0
    table = results_table(results)
    assert "(1 examples did not fit" in table and "no held-out rows to score for b:" in table


def test_unseen_task_naming_a_trained_source_fails_before_data(tmp_path):
    result = run_cli("data", "recipe=smoke", f"run_dir={tmp_path / 'run'}", "data.tasks=[copa]",
                     "eval.unseen_tasks=[copa]", check=False)
    assert "eval.unseen_tasks names 'copa', which data.tasks trains on" in one_line_error(result)
    assert not (tmp_path / "run").exists()


def test_a_failed_command_leaves_the_run_directory_as_it_was(tmp_path):
    args = prepared(tmp_path)
    run = tmp_path / "run"
    before = {p.name: p.read_text() for p in run.glob("config*.yaml")}
    bad = run_cli("data", *args, "data.sources.mine.columns={instruction: prompt, output: nope}", "data.max_length=300",
                  check=False)
    assert "missing column 'nope'" in one_line_error(bad)
    assert {p.name: p.read_text() for p in run.glob("config*.yaml")} == before
    fresh = run_cli("data", *args[:1], f"run_dir={tmp_path / 'new'}", *args[2:], "+data.sources.mine.task_column=nope",
                    check=False)
    assert "missing task column 'nope'" in one_line_error(fresh) and not (tmp_path / "new").exists()


def test_eval_compare_errors_exit_2_and_differing_examples_are_flagged(tmp_path):
    assert "no eval results at" in one_line_error(run_cli("eval", "compare", str(tmp_path), check=False))
    for name, n, digest in (("one", 8, "aaa"), ("two", 6, "bbb")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"tasks": {"copa": {"n": n, "kind": "choice", "accuracy": 0.5, "unseen": False, "examples": digest}},
             "mean_accuracy": 0.5}))
    table = run_cli("eval", "compare", str(tmp_path / "one"), str(tmp_path / "two"), cwd=tmp_path).stdout
    assert "| copa † | 0.500 (n=8) | 0.500 (n=6) |" in table and "scored different examples" in table


# ------------------------------------------------------------------------------------ one clear line per bad file
def test_non_utf8_files_name_the_byte_and_the_fix_and_an_encoding_key_reads_them(tmp_path):
    text = 'prompt,answer\n"caf\u00e9 au lait",yes\n'
    (tmp_path / "w.csv").write_bytes(text.encode("cp1252"))
    (tmp_path / "w.jsonl").write_bytes('{"prompt": "ok", "answer": "a"}\n{"prompt": "na\u00efve", "answer": "b"}\n'.encode("cp1252"))
    for file, line in (("w.csv", 2), ("w.jsonl", 2)):
        with pytest.raises(RexftError, match=rf"{file} is not utf-8 text: byte 0x[0-9a-f]{{2}} at offset \d+ \(line {line}\); "
                                             r"save it as UTF-8, or set data.sources.w.encoding"):
            splits(tmp_path, w=dict(path=file, **INSTRUCTION))
    (split,) = splits(tmp_path, w=dict(path="w.csv", encoding="cp1252", **INSTRUCTION))
    assert (split.train + split.eval)[0].prompt == "caf\u00e9 au lait"


@pytest.mark.parametrize("file,content,message", [
    ("m.jsonl", '{"prompt": "a", "answer": "b"}\n\n{"prompt": "a" "answer": "b"}\n', "m.jsonl line 3 column 16: not valid JSON"),
    ("m.json", '[{"prompt": "a",\n "answer": }]', "m.json line 2 column 12: not valid JSON"),
    ("e.jsonl", "", "file {} has no rows"),
    ("e.csv", "prompt,answer\n", "file {} has no rows"),
    ("e.json", "[]", "file {} has no rows"),
    ("x.csv", "prompt,answer\na,b\nc,d,e\n", "x.csv line 3: 3 cells, but the header (line 1) names 2 columns"),
])
def test_malformed_and_empty_files_are_one_line_naming_the_line(tmp_path, file, content, message):
    (tmp_path / file).write_text(content)
    with pytest.raises(RexftError) as err:
        splits(tmp_path, m=dict(path=file, **INSTRUCTION))
    assert message.format(tmp_path / file) in str(err.value)


def test_csv_cells_stay_text_and_bad_rows_are_named_by_their_editor_line(tmp_path):
    (tmp_path / "q.csv").write_text('q,a,b,c,gold\nPick one,1,2,3,C\n"Two\nlines",None,NA,007,A\nPick,x,y,z,D\n')
    spec = dict(format="choice", path="q.csv", columns={"question": "q", "options": ["a", "b", "c"], "answer": "gold"},
                answer_format="letter")
    with pytest.raises(RexftError, match=r"q: .*q.csv line 5: answer 'D' is not a letter A-C"):
        splits(tmp_path, q=spec)
    (tmp_path / "q.csv").write_text("\n".join((tmp_path / "q.csv").read_text().splitlines()[:4]) + "\n")
    (split,) = splits(tmp_path, q=spec)
    options = {e.row: e.options for e in split.train + split.eval}
    assert options == {0: ["1", "2", "3"], 1: ["None", "NA", "007"]}
