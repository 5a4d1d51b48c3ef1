"""The user's own tasks, declared in config: formats, file types, column maps, task columns, splits, errors,
loss masks and packing for generative examples, the real SNI records, and a mixed run through the CLI."""

import json

import pytest
import torch

import rexft
from conftest import assert_packed_equals_alone, randomize_adapters, run_cli, tiny_model
from rexft.config import AdapterConfig, DataConfig, ModelConfig, TaskSpec
from rexft.data import IGNORE_INDEX, PromptFormat, encode_example
from rexft.splits import build_splits, select_splits
from rexft.errors import RexftError
from rexft.modeling import byte_tokenizer

TOK = byte_tokenizer()
PLAIN = PromptFormat.for_model(TOK, ModelConfig(use_chat_template=False))
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

INSTRUCTION_ROWS = [{"kind": t, "prompt": f"Reverse the word {w}.", "text": w, "answer": w[::-1]}
                    for t in ("reverse", "upper") for w in ("alpha", "beta", "gamma", "delta", "omega", "sigma")]
CHAT_ROWS = [{"conversation": [{"from": "human", "value": f"Say {w}."}, {"from": "gpt", "value": f"{w}!"},
                               {"from": "human", "value": f"Again, louder: {w}."}, {"from": "gpt", "value": w.upper()}]}
             for w in ("one", "two", "three", "four", "five")]
CHOICE_ROWS = [{"q": f"Which is {c}?", "A": c, "B": "nothing", "gold": "A" if i % 2 else c}  # a letter or the option text
               for i, c in enumerate(("red", "green", "blue", "cyan", "pink", "gold"))]


def write(path, rows):
    """Write rows as .jsonl, .json, .csv or .parquet (by the file's suffix) with datasets, as a user might."""
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def spec(**kwargs) -> TaskSpec:
    return TaskSpec(**kwargs)


def splits_of(tmp_path, **specs):
    return build_splits(DataConfig(tasks=list(specs), sources=specs, local_dir=str(tmp_path)))


INSTRUCTION = dict(format="instruction", task_column="kind",
                   columns={"instruction": "prompt", "input": "text", "output": "answer"},
                   template="{instruction}\nWord: {input}")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_instruction_file_with_a_task_column_in_every_file_type(tmp_path, suffix):
    write(tmp_path / f"mine{suffix}", INSTRUCTION_ROWS)
    splits = splits_of(tmp_path, mine=spec(path=f"mine{suffix}", holdout=0.5, **INSTRUCTION))
    assert [s.task for s in splits] == ["reverse", "upper"] and all(s.source == "mine" for s in splits)
    for split in splits:
        assert split.kind == "generate" and len(split.train) == 3 and len(split.eval) == 3
        assert {e.row for e in split.train}.isdisjoint({e.row for e in split.eval})  # held out, disjoint
        assert split.train_source.startswith("train rows (seeded 50% part")
        example = split.train[0]
        record = INSTRUCTION_ROWS[example.row]
        assert example.prompt == f"{record['prompt']}\nWord: {record['text']}" and example.target == record["answer"]
        assert example.prompt[example.context_start:example.context_start + example.context_chars] == record["text"]
    again = splits_of(tmp_path, mine=spec(path=f"mine{suffix}", holdout=0.5, **INSTRUCTION))
    assert [e.row for e in again[0].eval] == [e.row for e in splits[0].eval]  # seeded


def test_named_validation_split_in_a_folder_and_include_exclude(tmp_path):
    write(tmp_path / "mine" / "train.jsonl", INSTRUCTION_ROWS)
    write(tmp_path / "mine" / "dev.csv", INSTRUCTION_ROWS[:2] + INSTRUCTION_ROWS[6:8])
    splits = splits_of(tmp_path, mine=spec(path="mine", validation_split="dev.csv", include=["upper"], **INSTRUCTION))
    (split,) = splits
    assert split.task == "upper" and len(split.train) == 6 and len(split.eval) == 2 and split.train_source == "train"
    assert select_splits(splits, ["mine"]) == splits and select_splits(splits, ["upper"]) == splits
    excluded = splits_of(tmp_path, mine=spec(path="mine", validation_split="dev.csv", exclude=["upper"], **INSTRUCTION))
    assert [s.task for s in excluded] == ["reverse"]


def test_chat_sharegpt_roles_and_the_prompt_the_prior_embeds(tmp_path):
    write(tmp_path / "chat.jsonl", CHAT_ROWS)
    (split,) = splits_of(tmp_path, talk=spec(format="chat", path="chat.jsonl", columns={"messages": "conversation"},
                                             system="Be brief."))
    example = split.train[0]
    assert split.task == "talk" and split.kind == "generate"
    assert example.messages[0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant", "user"]
    word = CHAT_ROWS[example.row]["conversation"][0]["value"].split()[1].rstrip(".")
    assert example.target == word.upper()
    # the prior embeds the conversation before the last assistant turn, never the target
    assert example.prompt == f"user: Say {word}.\nassistant: {word}!\nuser: Again, louder: {word}."


def test_choice_with_option_columns_letters_and_indices(tmp_path):
    write(tmp_path / "pick.csv", CHOICE_ROWS)
    (split,) = splits_of(tmp_path, pick=spec(format="choice", path="pick.csv", holdout=0.5,
                                             columns={"question": "q", "options": ["A", "B"], "answer": "gold"}))
    assert split.kind == "choice"
    for example in split.train + split.eval:
        record = CHOICE_ROWS[example.row]
        assert example.options == [record["A"], "nothing"] and example.letter == "A"
        assert example.prompt == f"{record['q']}\nA. {record['A']}\nB. nothing"


@pytest.mark.parametrize("case,rows,overrides,message", [
    ("missing column", INSTRUCTION_ROWS, {"columns": {"instruction": "prompt", "output": "reply"}},
     "missing column 'reply' (format instruction); columns found: answer, kind, prompt, text"),
    ("empty target", [{**INSTRUCTION_ROWS[0], "answer": " "}], {}, "empty target in column 'answer'"),
    ("no assistant turn", [{"messages": [{"role": "user", "content": "hi"}]}], {"format": "chat", "columns": {}, "task_column": None},
     "has no assistant turn"),
    ("task column without values", [{**r, "kind": None} for r in INSTRUCTION_ROWS], {}, "task column 'kind' has no values"),
])
def test_bad_records_name_task_file_and_column(tmp_path, case, rows, overrides, message):
    write(tmp_path / "bad.jsonl", rows)
    options = {**INSTRUCTION, **overrides}
    with pytest.raises(RexftError, match="bad.jsonl") as err:
        splits_of(tmp_path, mine=spec(path="bad.jsonl", **options))
    assert message in str(err.value)
    if case == "missing column":
        assert str(err.value).startswith("reverse: ")  # the task


def test_unreadable_file_and_duplicate_task_names(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{not json\n')
    with pytest.raises(RexftError, match=r"data.sources.mine: .*broken.jsonl line 2 column 2: not valid JSON"):
        splits_of(tmp_path, mine=spec(path="broken.jsonl", columns={"instruction": "prompt", "output": "answer"}))
    write(tmp_path / "a.jsonl", INSTRUCTION_ROWS)
    with pytest.raises(RexftError, match="two tasks are named 'reverse'"):
        splits_of(tmp_path, first=spec(path="a.jsonl", **INSTRUCTION), second=spec(path="a.jsonl", **INSTRUCTION))


def test_hub_source_through_local_files(tmp_path, monkeypatch):
    """The hub is unreachable here: serve datasets.load_dataset(hub id, subset, split) from local files."""
    import datasets

    write(tmp_path / "hub" / "train.jsonl", INSTRUCTION_ROWS)
    write(tmp_path / "hub" / "test.jsonl", INSTRUCTION_ROWS[:4])
    asked, real_load = [], datasets.load_dataset

    def fake_hub(path, name=None, split=None, **kwargs):
        if path in ("json", "csv", "parquet"):
            return real_load(path, name, split=split, **kwargs)
        asked.append((path, name, split))
        file = tmp_path / "hub" / f"{split}.jsonl"
        if not file.is_file():
            raise ValueError(f'Unknown split "{split}". Should be one of [train, test].')
        return real_load("json", data_files=str(file), split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    source = spec(hub="someone/tasks", subset="en", validation_split="test", path="hub", **INSTRUCTION)
    online = build_splits(DataConfig(tasks=["mine"], sources={"mine": source}, local_dir=None))
    assert asked == [("someone/tasks", "en", "train"), ("someone/tasks", "en", "test")]
    offline = build_splits(DataConfig(tasks=["mine"], sources={"mine": source}, local_dir=str(tmp_path)))
    assert len(asked) == 2  # data.local_dir set: the local copy is read, not the hub
    assert [[e.to_dict() for e in s.train + s.eval] for s in online] == [[e.to_dict() for e in s.train + s.eval] for s in offline]


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template"])
def test_loss_is_on_the_target_tokens_only(tmp_path, chat):
    tok = byte_tokenizer()
    if chat:
        tok.chat_template = CHATML
    fmt = PromptFormat(chat=chat, plain_template="{prompt}\nAnswer:")
    write(tmp_path / "i.jsonl", INSTRUCTION_ROWS)
    (split, _) = splits_of(tmp_path, mine=spec(path="i.jsonl", **INSTRUCTION))
    for example in split.train:
        row = encode_example(example, tok, fmt, 512)
        labelled = [t for t in row["labels"] if t != IGNORE_INDEX]
        assert tok.decode(labelled[:-1]) == fmt.answer_text(example.target) and labelled[-1] == tok.eos_token_id
        assert row["labels"][: row["prompt_length"]] == [IGNORE_INDEX] * row["prompt_length"]


def test_chat_loss_covers_every_assistant_turn_and_old_turns_go_first(tmp_path):
    tok = byte_tokenizer()
    tok.chat_template = CHATML
    fmt = PromptFormat(chat=True, plain_template="{prompt}")
    write(tmp_path / "chat.jsonl", CHAT_ROWS)
    (split,) = splits_of(tmp_path, talk=spec(format="chat", path="chat.jsonl", columns={"messages": "conversation"}))
    example = split.train[0]
    word = example.target.lower()
    row = encode_example(example, tok, fmt, 512)
    labelled = tok.decode([t for t in row["labels"] if t != IGNORE_INDEX])
    assert labelled == f"{word}!<|im_end|>\n{word.upper()}</s>"  # the earlier reply (with its end tag) and the target
    short = encode_example(example, tok, fmt, row["prompt_length"] - 5)  # too long: the first exchange goes
    assert short is not None and short["truncated"]
    kept = tok.decode(short["input_ids"])
    assert f"Say {word}." not in kept and f"Again, louder: {word}." in kept
    assert tok.decode([t for t in short["labels"] if t != IGNORE_INDEX]) == f"{word.upper()}</s>"
    assert encode_example(example, tok, fmt, 20) is None  # not even the last turn fits: dropped, never cut


def test_an_input_is_trimmed_before_an_example_is_dropped(tmp_path):
    rows = [{"kind": "t", "prompt": "Summarise.", "text": "word " * 200, "answer": "short"}]
    write(tmp_path / "long.jsonl", rows * 4)
    (split,) = splits_of(tmp_path, mine=spec(path="long.jsonl", **INSTRUCTION))
    row = encode_example(split.train[0], TOK, PLAIN, 300)
    assert row is not None and row["truncated"] and len(row["input_ids"]) <= 300
    text = TOK.decode(row["input_ids"])
    assert text.startswith("<s>Summarise.\nWord: word") and " ...\n" in text and text.endswith("\nAnswer: short</s>")
    assert encode_example(split.train[0], TOK, PLAIN, 24) is None  # the instruction and target alone do not fit


@torch.no_grad()
def test_packed_generative_examples_compute_what_they_compute_alone(tmp_path):
    write(tmp_path / "i.jsonl", INSTRUCTION_ROWS)
    (split, _) = splits_of(tmp_path, mine=spec(path="i.jsonl", **INSTRUCTION))
    rows = [encode_example(e, TOK, PLAIN, 256) for e in split.train[:3]]
    for row, prior in zip(rows, torch.rand(3, 8)):
        row["prior"] = prior
    model = randomize_adapters(rexft.inject_adapters(tiny_model(), AdapterConfig(type="trex", prior_dim=8, dropout=0)))
    assert_packed_equals_alone(model, rows, TOK.pad_token_id)


def test_real_sni_records_expand_into_120_tasks(data_dir):
    from rexft.cli import compose

    cfg, _ = compose(["recipe=demo-sni", f"data.local_dir={data_dir}", "data.train_per_task=null", "data.eval_per_task=null",
                      "data.sources.sni.max_tasks=null", "data.sources.sni_test.max_tasks=null"])
    splits = build_splits(cfg.data)
    assert len(splits) == 120 and all(s.kind == "generate" and s.source == "sni" for s in splits)
    assert all(len(s.train) == 100 and len(s.eval) == 20 and s.train_source == "train" for s in splits)
    record = json.loads((data_dir / "sni" / "train.jsonl").read_text().splitlines()[0])
    first = splits[0].train[0]
    assert first.task == record["task_name"] and first.target == record["targets"]
    assert first.prompt == (f"Definition: {record['definition']}\n\nNow complete the following example -\n"
                            f"Input: {record['inputs']}\nOutput:")
    unseen = build_splits(cfg.data, ["sni_test"])
    assert len(unseen) == 30 and all(len(s.eval) == 3 and not s.train for s in unseen)  # the recipe's cap
    demo, _ = compose(["recipe=demo-sni", f"data.local_dir={data_dir}"])
    assert [s.task for s in build_splits(demo.data)] == [s.task for s in splits[:40]]  # max_tasks: the first 40
    assert not {s.task for s in unseen} & {s.task for s in splits}


@pytest.mark.slow
def test_mixed_choice_and_generative_run_through_the_cli(tmp_path, data_dir):
    """Built-in choice tasks, a user's choice task and generative instruction + chat tasks in one run:
    data -> train (computes nothing it lacks) -> eval -> merge-export per task."""
    # a task value with a path separator: its export folder is escaped, and the manifest maps it back
    write(tmp_path / "files" / "i.jsonl", [{**row, "kind": row["kind"].replace("upper", "up/per")} for row in INSTRUCTION_ROWS])
    write(tmp_path / "files" / "chat.parquet", CHAT_ROWS)
    write(tmp_path / "files" / "pick.csv", CHOICE_ROWS)
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text(f"""# @package _global_
defaults:
  - override /adapter: mode
  - override /prior: none
name: mixed
data:
  tasks: [copa, mine, talk, pick]
  local_dir: {data_dir}
  max_length: 512
  train_per_task: 8
  eval_per_task: 4
  sources:
    mine: {{format: instruction, path: {tmp_path}/files/i.jsonl, task_column: kind, template: "{{instruction}} {{input}}",
           columns: {{instruction: prompt, input: text, output: answer}}}}
    talk: {{format: chat, path: {tmp_path}/files/chat.parquet, columns: {{messages: conversation}}, holdout: 0.4}}
    pick: {{format: choice, path: {tmp_path}/files/pick.csv, columns: {{question: q, options: [A, B], answer: gold}}}}
trainer: {{lr: 3.0e-3, epochs: 2, batch_size: 4}}
eval: {{max_new_tokens: 8}}
export: {{mode: per_task, fidelity_limit: 2}}
""")
    common = [f"recipe={recipe}", f"run_dir={tmp_path / 'run'}"]
    data = run_cli("data", *common)
    assert "| reverse | generate |" in data.stdout and "| talk | generate |" in data.stdout
    assert "| pick | choice | text, letter |" in data.stdout  # how its answers were read: option texts and letters
    run_cli("train", *common, "data.packing=true")  # generative and choice examples packed together
    run_cli("eval", *common)
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert {t: e["kind"] for t, e in results["tasks"].items()} == {
        "copa": "choice", "reverse": "generate", "up/per": "generate", "talk": "generate", "pick": "choice"}
    assert 0 <= results["mean_rouge_l"] <= 1 and 0 <= results["mean_accuracy"] <= 1
    run_cli("merge-export", *common)
    export = tmp_path / "run" / "export" / "per_task"
    assert sorted(p.name for p in export.iterdir() if p.is_dir()) == ["copa", "pick", "reverse", "talk", "up%2Fper"]
    manifest = json.loads((export.parent / "manifest.json").read_text())
    assert manifest["folders"]["up/per"] == "up%2Fper"
    assert (export / "up%2Fper" / "adapter_config.json").is_file()
    fidelity = (export / "fidelity.md").read_text()
    assert "| reverse |" in fidelity and "ROUGE-L" in fidelity and "accuracy" in fidelity


def test_bad_spec_is_one_line_and_leaves_earlier_output(tmp_path, data_dir):
    write(tmp_path / "i.jsonl", INSTRUCTION_ROWS)
    good = ["recipe=smoke", f"run_dir={tmp_path / 'run'}", "data.tasks=[mine]", f"data.local_dir={tmp_path}",
            "+data.sources.mine.path=i.jsonl", "+data.sources.mine.task_column=kind",
            "+data.sources.mine.columns={instruction: prompt, input: text, output: answer}"]
    run_cli("data", *good)
    before = (tmp_path / "run" / "data" / "train.jsonl").read_text()
    for bad, message in (("+data.sources.mine.format=alpaca", "'data.sources.mine.format': 'alpaca' is not one of"),
                         ("+data.sources.mine.colums={}", "data.sources.mine.colums"),
                         ("+data.sources.mine.template='{system}: {instruction}'", "unknown field(s) ['system']"),
                         ("+data.sources.mine.columns={output: nope}", "missing column 'nope'")):
        result = run_cli("data", *good, bad, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rexft: error:") and message in lines[0], result.stderr
    assert (tmp_path / "run" / "data" / "train.jsonl").read_text() == before


def test_the_readme_example_recipe_composes(tmp_path):
    """The "Your own data" example is copyable: it composes and every spec key is valid."""
    from rexft.cli import compose
    from rexft.tasks import task_names

    from conftest import ROOT

    text = (ROOT / "README.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    recipe = tmp_path / "my_recipe.yaml"
    recipe.write_text(block)
    (tmp_path / "quiz").mkdir()  # its relative `path: quiz`, found beside the recipe file
    cfg, _ = compose([f"recipe={recipe}"])
    assert cfg.data.sources["quiz"].path == str(tmp_path / "quiz")
    assert cfg.name == "my-tasks" and set(cfg.data.sources) == {"support", "assistant", "quiz"}
    assert [cfg.data.sources[n].format for n in ("support", "assistant", "quiz")] == ["instruction", "chat", "choice"]
    assert cfg.data.tasks == ["boolq", "support", "assistant", "quiz"] and "boolq" in task_names()
