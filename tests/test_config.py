"""Composition and validation of the Hydra config: every recipe and group option, and the error lines."""

import pytest

from conftest import run_cli
from rexft.cli import GROUPS, ConfigError, compose, options
from rexft.config import RunConfig


@pytest.mark.parametrize("recipe", options("recipe"))
def test_every_recipe_composes(recipe):
    cfg, _ = compose([f"recipe={recipe}"])
    assert isinstance(cfg, RunConfig)
    assert cfg.name == recipe
    assert cfg.run_dir == f"runs/{recipe}"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    cfg, _ = compose(["recipe=smoke", f"{group}={option}"])
    assert isinstance(cfg, RunConfig)


def test_commonsense14_is_the_study_setup():
    cfg, _ = compose(["recipe=commonsense14"])
    assert len(cfg.data.tasks) == 14
    assert (cfg.adapter.type, cfg.adapter.mode, cfg.adapter.r1, cfg.adapter.r2) == ("trex", "rank1_flex", 4, 8)
    assert cfg.adapter.exclude_modules == ["lm_head"] and cfg.prior.k == 32 == cfg.adapter.prior_dim
    t = cfg.trainer
    assert (t.lr, t.scheduler, t.warmup_steps, t.epochs, t.batch_size, t.grad_accum, t.max_grad_norm) == \
        (5e-5, "cosine", 100, 3, 4, 8, 0.3)
    assert cfg.data.max_length == 2048


def test_precedence_group_recipe_command_line():
    default, _ = compose([])
    recipe, _ = compose(["recipe=smoke"])
    command_line, _ = compose(["recipe=smoke", "trainer.lr=0.5", "adapter=lora"])
    assert default.trainer.lr == 5e-5 and recipe.trainer.lr == 3e-3 and command_line.trainer.lr == 0.5
    assert recipe.adapter.type == "trex" and command_line.adapter.type == "lora"


@pytest.mark.parametrize("override,fragment", [
    (["trainer.lrr=1"], "unknown config key 'trainer.lrr' (did you mean 'trainer.lr'?)"),
    (["recipe=smok"], "unknown recipe 'smok'; valid choices: commonsense14, demo, demo-sni, smoke, sni"),
    (["adapter=trexx"], "unknown adapter 'trexx'; valid choices:"),
    (["trainer.lr=fast"], "config key 'trainer.lr'"),
    (["data.tasks=[boolq,nope]"], "unknown task 'nope'"),
    (["adapter.mode=rank2"], "config key 'adapter.mode': 'rank2' is not one of rank1, rank1_flex"),
    (["noequals"], "is not of the form key=value"),
])
def test_bad_config_is_one_clear_error(override, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        compose(override)
    assert fragment in str(err.value)


def test_cli_errors_exit_2_with_one_line_and_no_traceback(tmp_path):
    result = run_cli("train", "recipe=smoke", "trainer.lrr=1", f"run_dir={tmp_path}", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["rexft: error: unknown config key 'trainer.lrr' (did you mean 'trainer.lr'?); valid keys of trainer: "
                     + lines[0].split("valid keys of trainer: ")[1]]
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # nothing written for a rejected config


def test_help_lists_commands_recipes_and_options():
    out = run_cli("--help").stdout
    for word in ("train", "cluster-prior", "eval", "merge-export", "commonsense14", "smoke", "demo", "trex", "mode", "zero3"):
        assert word in out
    assert "usage: rexft train" in run_cli("train", "--help").stdout


def test_print_config_composes_without_running(tmp_path):
    out = run_cli("train", "recipe=smoke", f"run_dir={tmp_path}/r", "--print-config").stdout
    assert "name: smoke" in out and "type: trex" in out
    assert not (tmp_path / "r").exists()


def test_unreachable_model_is_one_clear_error(tmp_path):
    result = run_cli("data", "recipe=smoke", f"run_dir={tmp_path}", "model.name_or_path=/nonexistent/model", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.name_or_path=/nonexistent/model: cannot load its tokenizer" in result.stderr
