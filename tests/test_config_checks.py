"""Every config value is checked before work starts: the range each schema field declares, the rules
between keys, and the CLI's one-line errors. Also: `rexft train` computes a missing prior itself, and
prior=none makes trex the "intuition" ablation."""

import dataclasses
import json
import typing
from typing import Optional

import pytest
import torch
from omegaconf import OmegaConf

import rexft
from conftest import randomize_adapters, run_cli, tiny_model
from rexft.cli import ConfigError, _stages, compose
from rexft.config import (AdapterConfig, Range, RunConfig, TaskSpec, bounded, expert_count, needs_range, schema_fields,
                          unbounded, valid_choices)

# data.sources.<name> holds TaskSpecs: their keys are checked like the others (here through demo-sni's `sni`)
SPEC_KEYS = [(f"data.sources.sni.{key}", f, kind) for key, f, kind in schema_fields(TaskSpec)]
SCHEMA = list(schema_fields(RunConfig)) + SPEC_KEYS
NEEDS_RANGE = [(key, f, kind) for key, f, kind in SCHEMA if needs_range(kind)]
CHOICES = [(key, f, kind) for key, f, kind in SCHEMA if "choices" in f.metadata]
BOUNDED = [(key, f, kind) for key, f, kind in NEEDS_RANGE if "range" in f.metadata and not f.metadata["range"].unbounded]


def outside(rng: Range, kind) -> list:
    """Values just past each bound of ``rng`` (sentinels in ``allow`` skipped)."""
    if rng.min_items is not None:
        return [[]] if rng.min_items == 1 else [["x"] * (rng.min_items - 1)]
    step = 1 if int in (kind, *getattr(kind, "__args__", ())) else 0.5
    values = []
    if rng.ge is not None:
        below = rng.ge - step
        while below in rng.allow:
            below -= step
        values.append(below)
    if rng.gt is not None:
        values.append(rng.gt)
    if rng.le is not None:
        values.append(rng.le + step)
    if rng.lt is not None:
        values.append(rng.lt)
    return values


def override_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(repr(item) for item in value) + "]"
    return repr(value)


def value_at(cfg, key: str):
    for part in key.split("."):
        cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg


def recipe_for(key: str) -> str:
    return "recipe=demo-sni" if key.startswith("data.sources.") else "recipe=smoke"


# ------------------------------------------------------------------------------------- the schema itself
@pytest.mark.parametrize("key,f,kind", NEEDS_RANGE, ids=[k for k, _, _ in NEEDS_RANGE])
def test_every_numeric_and_list_key_declares_its_range(key, f, kind):
    """A number or list added to rexft/config.py without bounded(...) or unbounded(...) fails here."""
    declared = isinstance(f.metadata.get("range"), Range) or "choices" in f.metadata
    assert declared, f"{key}: declare its range with bounded(...) or unbounded() (a list of choices: one_of(...))"


def test_a_key_without_a_range_is_caught():
    @dataclasses.dataclass
    class Probe:
        forgotten: int = 3
        forgotten_list: Optional[list[str]] = None
        declared: float = bounded(1.0, gt=0)
        free: int = unbounded(0)
        flag: bool = True  # not a number: needs no range

    missing = [key for key, f, kind in schema_fields(Probe) if needs_range(kind) and "range" not in f.metadata]
    assert missing == ["forgotten", "forgotten_list"]
    with pytest.raises(ValueError, match="unbounded"):
        bounded(1)  # no bound given: say unbounded() instead


@pytest.mark.parametrize("key,f,kind", BOUNDED, ids=[k for k, _, _ in BOUNDED])
def test_out_of_range_values_are_rejected_naming_the_key(key, f, kind):
    rng = f.metadata["range"]
    bad_values = outside(rng, kind)
    assert bad_values, f"{key}: no value outside {rng}"
    for bad in bad_values:
        assert not rng.check(bad)
        with pytest.raises(ConfigError) as err:
            compose([recipe_for(key), f"{key}={override_value(bad)}"])
        assert str(err.value).startswith(f"config key '{key}': ") and f"(must be {rng})" in str(err.value)


@pytest.mark.parametrize("key,f,kind", BOUNDED, ids=[k for k, _, _ in BOUNDED])
def test_the_default_and_each_sentinel_compose(key, f, kind):
    rng = f.metadata["range"]
    default = value_at(compose([recipe_for(key)])[0], key)
    for good in [default, *rng.allow]:
        cfg, _ = compose([recipe_for(key), f"{key}={override_value(good)}"])
        assert value_at(cfg, key) == good


@pytest.mark.parametrize("key,f,kind", CHOICES, ids=[k for k, _, _ in CHOICES])
def test_each_choice_composes_and_anything_else_is_rejected_naming_the_key(key, f, kind):
    valid = valid_choices(f)
    assert valid, f"{key}: one_of(...) without choices"
    is_list = typing.get_origin(kind) is list
    for good in valid:
        try:
            cfg, _ = compose([recipe_for(key), f"{key}={override_value([good] if is_list else good)}"])
        except ConfigError as err:  # a rule between keys may refuse it (export.mode=merged with trex): not the choice
            assert "is not one of" not in str(err)
            continue
        assert value_at(cfg, key) == ([good] if is_list else good)
    bad = "not-a-choice"
    with pytest.raises(ConfigError) as err:
        compose([recipe_for(key), f"{key}={override_value([bad] if is_list else bad)}"])
    names = ", ".join("null" if v is None else v for v in valid)
    assert str(err.value) == f"config key '{key}': '{bad}' is not one of {names}"


def test_choices_come_from_the_file_tree_where_it_is_the_registry():
    from rexft.adapters import adapter_types

    (field,) = [f for key, f, _ in CHOICES if key == "adapter.type"]
    assert valid_choices(field) == adapter_types() and "trex" in adapter_types()


def test_range_edges_and_wording():
    assert Range(ge=1).check(1) and not Range(ge=1).check(0) and str(Range(ge=1)) == ">= 1"
    assert Range(gt=0).check(1e-9) and not Range(gt=0).check(0) and str(Range(gt=0)) == "> 0"
    fraction = Range(gt=0, lt=1)
    assert fraction.check(0.5) and not fraction.check(0) and not fraction.check(1) and str(fraction) == "in (0, 1)"
    assert str(Range(ge=0, lt=1)) == "in [0, 1)" and Range(ge=0, lt=1).check(0)
    steps = Range(ge=1, allow=(-1,))
    assert steps.check(-1) and steps.check(1) and not steps.check(0) and str(steps) == "-1 or >= 1"
    cap = Range(ge=1, allow=(None,))
    assert cap.check(None) and not Range(ge=1).check(None) and str(cap) == "null or >= 1"
    assert Range(min_items=1).check(["a"]) and not Range(min_items=1).check([]) and str(Range(min_items=1)) == "non-empty"
    assert Range().unbounded and Range().check(-10**9) and str(Range()) == "any value"


def test_every_value_of_every_recipe_is_in_range():
    from rexft.cli import options
    from rexft.config import range_violations

    for recipe in options("recipe"):
        assert range_violations(compose([f"recipe={recipe}"])[0]) == []


# ------------------------------------------------------------------------------------ rules between keys
@pytest.mark.parametrize("overrides,fragment", [
    (["adapter.top_k=9"], "config key 'adapter.top_k': 9 is more than the 8 experts of adapter.type=trex (adapter.r1 * adapter.r2)"),
    (["adapter.mode=rank1", "adapter.r=4", "adapter.top_k=5"], "more than the 4 experts of adapter.type=trex (adapter.r (adapter.mode=rank1))"),
    (["adapter=molora", "adapter.num_experts=3", "adapter.top_k=4"], "more than the 3 experts of adapter.type=molora"),
    (["adapter=hydralora", "adapter.num_experts=2", "adapter.top_k=3"], "more than the 2 experts of adapter.type=hydralora"),
    (["adapter=mode", "adapter.num_experts=6", "adapter.top_k=7"], "more than the 6 experts of adapter.type=mode"),
    (["adapter=lora", "adapter.top_k=1"], "adapter.type=lora has no experts to route; set adapter.top_k=null"),
    (["prior=none", "adapter.use_router=false"], "'adapter.use_router' and 'adapter.use_prior'"),
    (["adapter.use_prior=false", "adapter.use_router=false"], "set adapter.use_router=true or use a prior"),
    (["adapter.prior_dim=16"], "config keys 'adapter.prior_dim' (16) and 'prior.k' (8) differ"),
    (["export.mode=merged"], "merged needs adapter.type=lora, but adapter.type=trex"),
    (["model.tiny.hidden_size=66"], "'model.tiny.hidden_size' (66) and 'model.tiny.num_attention_heads' (4)"),
    (["model.tiny.num_key_value_heads=3"], "'model.tiny.num_attention_heads' (4) and 'model.tiny.num_key_value_heads' (3)"),
], ids=["trex-flex-top_k", "trex-rank1-top_k", "molora-top_k", "hydralora-top_k", "mode-top_k", "lora-top_k",
        "no-router-no-prior(prior=none)", "no-router-no-prior", "prior_dim-vs-k", "merged-needs-lora", "tiny-heads",
        "tiny-kv-heads"])
def test_contradictory_keys_are_one_clear_error(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        compose(["recipe=smoke", *overrides])
    assert fragment in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["adapter.top_k=8"],
    ["adapter=mode", "adapter.num_experts=6", "adapter.top_k=6"],
    ["adapter.prior_dim=16", "adapter.use_prior=false"],  # prior_dim only matters when the prior is read
    ["adapter.prior_dim=16", "prior=none"],
    ["prior.k=16"],  # adapter=trex's prior_dim follows prior.k
    ["adapter=lora", "export.mode=merged"],
], ids=lambda o: " ".join(o))
def test_consistent_keys_compose(overrides):
    cfg, _ = compose(["recipe=smoke", *overrides])
    assert cfg.prior.k == cfg.adapter.prior_dim or not cfg.adapter.use_prior or cfg.adapter.type != "trex"


@pytest.mark.parametrize("kind,kw", [("trex", {}), ("trex", {"mode": "rank1"}), ("molora", {}), ("hydralora", {}),
                                     ("mode", {})], ids=["trex", "trex-rank1", "molora", "hydralora", "mode"])
def test_expert_count_is_the_width_top_k_chooses_among(kind, kw):
    """top_k = expert_count keeps every expert (== dense routing); one fewer drops one (!= dense)."""
    base = AdapterConfig(type=kind, use_prior=False, dropout=0.0, **kw)
    count = expert_count(base)
    x = torch.tensor([[1, 50, 60, 70]])

    def logits(top_k):
        cfg = dataclasses.replace(base, top_k=top_k)
        return randomize_adapters(rexft.inject_adapters(tiny_model(), cfg), seed=3)(input_ids=x).logits

    dense = logits(None)
    torch.testing.assert_close(logits(count), dense)
    assert not torch.allclose(logits(count - 1), dense)


def test_prior_none_makes_trex_the_intuition_ablation():
    cfg, resolved = compose(["recipe=smoke", "prior=none"])
    assert cfg.adapter.type == "trex" and cfg.adapter.use_prior is False and cfg.adapter.use_router
    assert OmegaConf.to_container(resolved)["adapter"]["use_prior"] is False  # config.yaml records it
    assert compose(["recipe=smoke", "prior=none", "adapter=lora"])[0].adapter.type == "lora"


def test_train_runs_data_and_cluster_prior_first_only_when_they_are_missing(tmp_path):
    import json

    from rexft.data import prepare_data
    from rexft.prior import data_fingerprint, training_texts

    cfg, _ = compose(["recipe=smoke", f"run_dir={tmp_path}", "data.tasks=[copa]"])
    stages = _stages("train", cfg)
    assert next(stages) == "data"  # no split record yet
    prepare_data(cfg)  # what that stage does; the stages after it are decided once it has run
    assert list(stages) == ["cluster-prior", "train"]
    assert list(_stages("eval", cfg)) == ["eval"]
    (tmp_path / "prior").mkdir()
    (tmp_path / "prior" / "meta.json").write_text(json.dumps({"data_fingerprint": data_fingerprint(training_texts(cfg)[0])}))
    assert list(_stages("train", cfg)) == ["train"]
    (tmp_path / "prior" / "meta.json").write_text(json.dumps({"data_fingerprint": "other rows"}))
    assert list(_stages("train", cfg)) == ["cluster-prior", "train"]
    other_data, _ = compose(["recipe=smoke", f"run_dir={tmp_path}", "data.tasks=[copa]", "data.train_per_task=4"])
    assert next(_stages("cluster-prior", other_data)) == "data"  # a record made with other data settings
    for no_prior in (["prior=none"], ["adapter=lora"], ["adapter.use_prior=false"]):
        cfg, _ = compose(["recipe=smoke", f"run_dir={tmp_path / 'fresh'}", *no_prior])
        assert list(_stages("train", cfg)) == ["data", "train"]


# -------------------------------------------------------------------------------------- through the CLI
@pytest.mark.parametrize("command,override,message", [
    ("train", "trainer.lr=-1 adapter.use_prior=false", "config key 'trainer.lr': -1.0 is out of range (must be > 0)"),
    ("train", "trainer.batch_size=0", "config key 'trainer.batch_size': 0 is out of range (must be >= 1)"),
    ("cluster-prior", "prior.k=0", "config key 'prior.k': 0 is out of range (must be >= 2)"),
    ("train", "adapter.top_k=0", "config key 'adapter.top_k': 0 is out of range (must be null or >= 1)"),
    ("train", "adapter.r1=0", "config key 'adapter.r1': 0 is out of range (must be >= 1)"),
    ("train", "adapter.top_k=9", "config key 'adapter.top_k': 9 is more than the 8 experts"),
])
def test_cli_rejects_bad_values_before_any_work(tmp_path, data_dir, command, override, message):
    fresh = tmp_path / "fresh"
    result = run_cli(command, "recipe=smoke", f"run_dir={fresh}", f"data.local_dir={data_dir}", *override.split(),
                     check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rexft: error: {message}"), result.stderr
    assert "Traceback" not in result.stderr
    assert not fresh.exists()


def test_cli_leaves_an_existing_run_directory_untouched(tmp_path, data_dir):
    (tmp_path / "config.yaml").write_text("earlier run\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli("train", "recipe=smoke", f"run_dir={tmp_path}", f"data.local_dir={data_dir}", "trainer.lr=-1",
                     check=False)
    assert result.returncode == 2 and result.stderr.startswith("rexft: error: config key 'trainer.lr'")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "config.yaml").read_text() == "earlier run\n"


def test_help_says_every_value_is_checked():
    assert "checked before any work starts" in run_cli("--help").stdout


def test_train_on_a_fresh_run_directory_computes_the_prior_first(tmp_path, data_dir):
    run_dir = tmp_path / "fresh"
    result = run_cli("train", "recipe=smoke", f"run_dir={run_dir}", f"data.local_dir={data_dir}", "trainer.max_steps=2")
    assert "running cluster-prior first" in result.stderr
    meta = json.loads((run_dir / "prior" / "meta.json").read_text())
    assert meta["k"] == 8
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["adapter"]["use_prior"] is True and config["prior"]["k"] == 8
    assert (run_dir / "config.cluster-prior.yaml").is_file() and (run_dir / "config.train.yaml").is_file()


def test_prior_none_trains_trex_without_the_prior(tmp_path, data_dir):
    run_dir = tmp_path / "intuition"
    result = run_cli("train", "recipe=smoke", f"run_dir={run_dir}", f"data.local_dir={data_dir}", "prior=none",
                     "trainer.max_steps=2")
    assert "without a cluster prior" in result.stderr
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["adapter"]["type"] == "trex" and config["adapter"]["use_prior"] is False
    assert config["prior"] is None and not (run_dir / "prior").exists()
    assert "use_prior: false" in (run_dir / "config.yaml").read_text()
