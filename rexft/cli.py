"""Command line: ``rexft <command> [recipe=NAME] [group=option] [key=value ...]``.

Every command composes the same Hydra config (configs/rexft.yaml + groups + recipes/NAME.yaml +
command-line overrides), validates it against :class:`rexft.config.RunConfig` (keys, types, choices,
the range each field declares, and the rules between keys) before any model or data is loaded or
anything is written, then writes the resolved YAML into the run directory and calls one stage function
with the typed config. This is the only module that touches Hydra/OmegaConf.
"""

from __future__ import annotations

import codecs
import difflib
import logging
import string
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Callable, Iterator

from rexft.config import (ConfigError, RunConfig, choice_violations, config_root, expert_count, not_a_choice,
                          range_violations, schema_fields, task_specs)
from rexft.errors import RexftError

log = logging.getLogger(__name__)

GROUPS = ("model", "data", "adapter", "prior", "trainer")
USER_RECIPE = "user-file/recipe"  # the name a recipe file is composed under: recipes/ has no sub-folders

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module:function, one-line help)
    "data": ("rexft.data:prepare_data", "format, mix and tokenize the datasets; write data/ and stats"),
    "cluster-prior": ("rexft.prior:cluster_prior", "embed training prompts, k-means, write prior/"),
    "train": ("rexft.train:train", "inject adapters and train; write adapter/ and checkpoints/"),
    "eval": ("rexft.eval.stage:evaluate", "score the validation sets; write eval/results.json"),
    "merge-export": ("rexft.export:merge_export", "merge or export adapters for standard tools; write export/"),
    "serve": ("rexft.serve.stage:serve", "serve the run behind an OpenAI-compatible endpoint (local engine or vLLM)"),
    "plan": ("rexft.plan:plan", "per-device training memory from the model config alone (plan.world_size, plan.device)"),
}


def options(group: str) -> list[str]:
    folder = config_root() / ("recipes" if group == "recipe" else f"configs/{group}")
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _schema_keys(node) -> list[str]:
    return [f.name for f in fields(node)] if is_dataclass(node) else []


def _child(node, part: str):
    """The schema node below ``part``: a dataclass field's value, or for a dict of specs (``data.sources``)
    a marker meaning "any name, then the spec's keys"."""
    from rexft.config import DataConfig, TaskSpec

    value = getattr(node, part)
    if isinstance(node, DataConfig) and part == "sources":
        return {"__any__": TaskSpec()}
    return value


def _check_override(override: str) -> None:
    """Name the culprit of a bad override before Hydra sees it."""
    if "=" not in override:
        raise ConfigError(f"argument '{override}' is not of the form key=value")
    key, value = override.split("=", 1)
    key = key.lstrip("+~")
    if key == "recipe" and value.endswith((".yaml", ".yml")):
        if not Path(value).is_file():
            raise ConfigError(f"recipe file {value} does not exist")
        return
    if key in ("recipe",) + GROUPS:
        valid = options(key)
        if value not in valid:
            raise ConfigError(f"unknown {key} '{value}'; valid choices: {', '.join(valid)}")
        return
    node, path = RunConfig(), []
    for part in key.split("."):
        if isinstance(node, dict):  # a dict-valued key: any name, then the value type's keys
            node, path = node["__any__"], path + [part]
            if node is None:
                return
            continue
        valid = _schema_keys(node)
        if part not in valid:
            where = ".".join(path) or "the root config"
            hint = difflib.get_close_matches(part, valid, n=1)
            raise ConfigError(
                f"unknown config key '{key}'"
                + (f" (did you mean '{'.'.join(path + hint)}'?)" if hint else "")
                + f"; valid keys of {where}: {', '.join(valid)}"
            )
        node, path = _child(node, part), path + [part]


def hydra_overrides(overrides: list[str], served: Path) -> tuple[list[str], Path | None]:
    """The command line as Hydra overrides: ``recipe=NAME`` selects the ``recipes`` group, a recipe file is
    served from ``served`` under a name no built-in recipe has, and a task spec's keys are added or
    overridden (``++``: they may be absent from its YAML; the CLI checks spec keys itself).
    Returns (overrides, the recipe file or None)."""
    import shutil

    search, out, recipe_file = [f"file://{config_root()}"], [], None
    for override in overrides:
        if not override.startswith("recipe="):
            out.append(f"++{override}" if override.startswith("data.sources.") else override)
            continue
        recipe = override.split("=", 1)[1]
        if recipe.endswith((".yaml", ".yml")):
            recipe_file = Path(recipe).resolve()
            (served / "recipes" / USER_RECIPE).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(recipe, served / "recipes" / f"{USER_RECIPE}.yaml")
            search.append(f"file://{served}")
            recipe = USER_RECIPE
        out.append(f"recipes={recipe}")
    return [f"hydra.searchpath=[{','.join(search)}]", *out], recipe_file


def compose(overrides: list[str]):
    """Compose and validate; returns (typed RunConfig, resolved DictConfig)."""
    import shutil
    import tempfile

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    for override in overrides:
        _check_override(override)
    store_schema()
    served = Path(tempfile.mkdtemp(prefix="rexft-recipe-"))  # a user's recipe file is served from here
    GlobalHydra.instance().clear()
    try:
        composed_overrides, recipe_file = hydra_overrides(overrides, served)
        with initialize_config_dir(config_dir=str(config_root() / "configs"), version_base=None):
            composed = hydra_compose(config_name="rexft", overrides=composed_overrides)
    except ConfigError:
        raise
    except Exception as err:  # Hydra's errors are multi-line and wrap OmegaConf's: name the key
        raise hydra_error(err) from None
    finally:
        shutil.rmtree(served, ignore_errors=True)
        GlobalHydra.instance().clear()
    return typed_config(composed, recipe_file)


def store_schema() -> None:
    """The dataclass schema is the base of configs/rexft.yaml's defaults list: every documented key exists
    (with its default) whatever group option is chosen, and Hydra type-checks while composing."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="rexft_schema", node=RunConfig)


def hydra_error(err: Exception) -> ConfigError:
    cause = err.__cause__
    key = getattr(cause, "full_key", None)
    if key and cause is not None:
        return ConfigError(f"config key '{key}': {str(cause).strip().splitlines()[0]}")
    return ConfigError(str(err).strip().splitlines()[0])


def typed_config(composed, recipe_file: Path | None = None):
    """A composed config as the typed RunConfig, checked (types, task specs, choices, ranges, the rules
    between keys): returns (typed RunConfig, resolved DictConfig)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.set_struct(composed, False)
        schema = OmegaConf.structured(RunConfig)
        merged = OmegaConf.merge(schema, composed)
        derived = _interpolated_keys(merged)
        OmegaConf.resolve(merged)
        typed: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        message = str(err).strip().splitlines()[0]
        raise ConfigError(f"config key '{key}': {message}" if key else message) from None
    typed.data.sources = task_specs(typed.data.sources)
    if recipe_file is not None:
        _paths_beside_recipe(typed, recipe_file)
    if prior_ablation(typed):
        # prior=none with trex means the "intuition" ablation: train without the prior rather than fail
        # for want of one. Set in the resolved YAML too, so config.yaml and the adapter record it.
        typed.adapter.use_prior = False
        merged.adapter.use_prior = False
    _validate(typed, derived)
    return typed, merged


def _paths_beside_recipe(cfg: RunConfig, recipe_file: Path) -> None:
    """A relative source path the recipe file sets is also tried beside that file (after the working
    directory and data.local_dir); where it is found only there, the spec gets that absolute path, and where
    a used source's path is found nowhere, the error lists all three places."""
    from omegaconf import OmegaConf

    from rexft.sources import path_candidates

    written = OmegaConf.to_container(OmegaConf.load(recipe_file), resolve=False) or {}
    declared = (written.get("data") or {}).get("sources") or {}
    used = set(cfg.data.tasks) | set(cfg.eval.unseen_tasks)
    for name, spec in cfg.data.sources.items():
        if spec.path is None or (declared.get(name) or {}).get("path") != spec.path:
            continue
        candidates = path_candidates(spec.path, cfg.data, (recipe_file.parent,))
        found = next((c for c in candidates if c.exists()), None)
        if found is None and name in used and len(candidates) > 1 and not (spec.hub and cfg.data.local_dir is None):
            raise ConfigError(f"data.sources.{name}: path {spec.path} not found; looked for "
                              f"{', '.join(map(str, candidates))}")
        if found is not None and found == candidates[-1] and len(candidates) > 1:
            spec.path = str(found)


def _interpolated_keys(config) -> set[str]:
    """Keys whose value is copied from another (``adapter.prior_dim: ${prior.k}``): an out-of-range
    value there is reported at the key it came from."""
    from omegaconf import OmegaConf

    derived = set()
    for key, _, _ in schema_fields(RunConfig):
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(config, parent) if parent else config
        if node is not None and OmegaConf.is_interpolation(node, leaf):
            derived.add(key)
    return derived


def prior_ablation(cfg: RunConfig) -> bool:
    """A trex adapter with no cluster prior to read (prior=none): it runs with ``use_prior=false``."""
    return cfg.adapter.type == "trex" and not cfg.prior.enabled


def _validate(cfg: RunConfig, derived: set[str] = frozenset()) -> None:
    """Choices, then each key's declared range, then the rules between keys: the first failure is one line."""
    _check_choices(cfg)
    violations = sorted(range_violations(cfg), key=lambda violation: violation[0] in derived)
    if violations:
        key, value, valid = violations[0]
        raise ConfigError(f"config key '{key}': {value!r} is out of range (must be {valid})")
    _check_cross_keys(cfg)


def _check_choices(cfg: RunConfig) -> None:
    from rexft.formats import FIELDS, FORMATS
    from rexft.tasks import task_names

    for key, value, valid in choice_violations(cfg):
        raise not_a_choice(key, value, valid)
    for name, spec in cfg.data.sources.items():
        if spec.format not in FORMATS:
            raise ConfigError(f"config key 'data.sources.{name}.format': '{spec.format}' is not one of {', '.join(FORMATS)}")
        if spec.path is None and spec.hub is None:
            raise ConfigError(f"data.sources.{name} names no source: give a local `path` or a `hub` dataset id")
        if name in task_names():
            raise ConfigError(f"data.sources.{name} has the name of a built-in task; rename the source")
        try:
            codecs.lookup(spec.encoding)
        except LookupError:
            raise ConfigError(f"config key 'data.sources.{name}.encoding': unknown encoding '{spec.encoding}' "
                              "(e.g. utf-8, cp1252, latin-1)") from None
        for key in ("template", "template_no_input"):
            fields = {f for _, f, _, _ in string.Formatter().parse(getattr(spec, key)) if f is not None}
            if fields - {"instruction", "input"}:
                raise ConfigError(f"config key 'data.sources.{name}.{key}': unknown field(s) {sorted(fields - {'instruction', 'input'})}; "
                                  "a template may use {instruction} and {input}")
        unknown = sorted(set(spec.columns) - set(FIELDS[spec.format][0] + FIELDS[spec.format][1]))
        if unknown:
            raise ConfigError(f"config key 'data.sources.{name}.columns': unknown field(s) {unknown} for format "
                              f"{spec.format}; its fields: {', '.join(FIELDS[spec.format][0] + FIELDS[spec.format][1])}")
    known = task_names() + sorted(cfg.data.sources)
    for key, entries in (("data.tasks", cfg.data.tasks), ("eval.unseen_tasks", cfg.eval.unseen_tasks)):
        seen = set()
        for task in entries:
            if task not in known:
                hint = difflib.get_close_matches(task, known, n=1)
                raise ConfigError(f"{key}: unknown task '{task}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                                  + f"; built-in tasks: {', '.join(task_names())}; data.sources: "
                                  + (", ".join(sorted(cfg.data.sources)) or "none declared"))
            if task in seen:
                raise ConfigError(f"{key} names '{task}' twice")
            seen.add(task)
    trained = [task for task in cfg.eval.unseen_tasks if task in cfg.data.tasks]
    if trained:
        raise ConfigError(f"eval.unseen_tasks names '{trained[0]}', which data.tasks trains on; an unseen task is "
                          "one never trained on: remove it from one of the two lists")
    # eval.tasks may also name single tasks of a source's task column: checked once the data is read.
    for task in cfg.eval.tasks or []:
        if task in task_names() and task not in cfg.data.tasks:
            raise ConfigError(f"eval.tasks names '{task}', which is not in data.tasks (eval.unseen_tasks evaluates tasks never trained on)")


def _check_cross_keys(cfg: RunConfig) -> None:
    """Keys that are each in range but contradict one another; every message names both and the way out."""
    from rexft.modeling import TINY

    adapter = cfg.adapter
    experts = expert_count(adapter)
    if adapter.top_k is not None and experts is None:
        raise ConfigError(f"config key 'adapter.top_k': {adapter.top_k}, but adapter.type={adapter.type} has no "
                          "experts to route; set adapter.top_k=null or choose a mixture adapter (molora, hydralora, "
                          "mode, trex)")
    if adapter.top_k is not None and adapter.top_k > experts:
        if adapter.type == "trex":
            count = "adapter.r1 * adapter.r2" if adapter.mode == "rank1_flex" else "adapter.r (adapter.mode=rank1)"
        else:
            count = "adapter.num_experts" + (" atoms per rank position" if adapter.type == "mode" else "")
        raise ConfigError(f"config key 'adapter.top_k': {adapter.top_k} is more than the {experts} experts of "
                          f"adapter.type={adapter.type} ({count}); set adapter.top_k <= {experts} (null: dense "
                          "routing) or add experts")
    if adapter.type == "trex" and not (adapter.use_router or adapter.use_prior):
        why = "prior=none (prior.enabled=false) turns adapter.use_prior off" if prior_ablation(cfg) else \
            "adapter.use_prior=false"
        raise ConfigError(f"config keys 'adapter.use_router' and 'adapter.use_prior': trex needs one of them, but "
                          f"adapter.use_router=false and {why}; set adapter.use_router=true or use a prior "
                          "(prior=minilm)")
    if adapter.type == "trex" and adapter.use_prior and adapter.prior_dim != cfg.prior.k:
        raise ConfigError(f"config keys 'adapter.prior_dim' ({adapter.prior_dim}) and 'prior.k' ({cfg.prior.k}) "
                          "differ: the adapter reads a prior of prior.k cluster similarities; set "
                          f"adapter.prior_dim={cfg.prior.k} or leave it out (adapter=trex sets it to prior.k)")
    if cfg.data.prompt_style == "harness" and cfg.eval.protocol != "loglik":
        raise ConfigError(f"config keys 'data.prompt_style' (harness) and 'eval.protocol' ({cfg.eval.protocol}): "
                          "harness-style options are continuations with no letters to score; set eval.protocol=loglik "
                          "(lm-eval's own scoring)")
    if cfg.export.mode == "merged" and adapter.type != "lora":
        raise ConfigError(f"config key 'export.mode': merged needs adapter.type=lora, but adapter.type={adapter.type} "
                          "routes per token and has no single merged weight; use export.mode=per_task, per_cluster "
                          "or adapter")
    tiny = cfg.model.tiny
    if cfg.model.name_or_path == TINY and tiny.hidden_size % tiny.num_attention_heads:
        raise ConfigError(f"config keys 'model.tiny.hidden_size' ({tiny.hidden_size}) and "
                          f"'model.tiny.num_attention_heads' ({tiny.num_attention_heads}): hidden_size must be a "
                          "multiple of num_attention_heads")
    if cfg.model.name_or_path == TINY and tiny.num_attention_heads % tiny.num_key_value_heads:
        raise ConfigError(f"config keys 'model.tiny.num_attention_heads' ({tiny.num_attention_heads}) and "
                          f"'model.tiny.num_key_value_heads' ({tiny.num_key_value_heads}): num_attention_heads must be "
                          "a multiple of num_key_value_heads")


def usage(command: str | None = None) -> str:
    lines = []
    if command is None:
        lines += ["usage: rexft <command> [-m] [recipe=NAME] [group=option ...] [key=value ...] [--print-config]", "",
                  "Multitask PEFT with mixtures of rank-one experts (T-REX, MoDE) and LoRA baselines.", "",
                  "commands:"]
        lines += [f"  {name:<14} {text}" for name, (_, text) in COMMANDS.items()]
        lines += ["  eval compare   rexft eval compare RUN_DIR [RUN_DIR ...]: side-by-side table + bar chart"]
        lines += ["  sweep report   rexft sweep report SWEEP_DIR: every job of a `-m` sweep, the best on the tuning split"]
        lines += ["  harness        rexft harness --model rexft --model_args run_dir=DIR --tasks rexft_harness ...: "
                  "lm-evaluation-harness (its own arguments) with rexft's model and task definitions"]
    else:
        lines += [f"usage: rexft {command} [-m] [recipe=NAME] [group=option ...] [key=value ...] [--print-config]",
                  "", COMMANDS[command][1]]
    lines += ["", f"recipes:  {', '.join(options('recipe'))}"]
    lines += [f"{group + ':':<9} {', '.join(options(group))}" for group in GROUPS]
    lines += ["", "Keys are those of configs/rexft.yaml and its groups, e.g. trainer.lr=1e-4 data.local_dir=PATH.",
              "Every key, type, choice and range is checked before any work starts (an error is one line, exit 2).",
              "--print-config prints the composed config and exits. Precedence: group < recipe < command line.",
              "-m / --multirun sweeps (Hydra's syntax: adapter=lora,trex trainer.lr=1e-4,1e-3; hydra/sweeper=optuna):",
              "one run directory per job under runs/<name>/sweep-<id>/, finished jobs skipped when re-run."]
    return "\n".join(lines)


def _stage(command: str) -> Callable:
    return _load(COMMANDS[command][0])


def _load(target: str) -> Callable:
    """A command's function from its "module:function" name, imported only when that command runs (so the
    CLI stays the top of the import graph: no stage imports it back)."""
    import importlib

    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def entry() -> None:
    """The ``rexft`` program (console script and ``python -m rexft``): glibc set to keep freed memory
    (``rexft.process``), then ``main``."""
    from rexft.process import reexec_with_kept_heap

    reexec_with_kept_heap()
    sys.exit(main())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, args = argv[0], argv[1:]
    if command == "eval" and args and args[0] == "compare":
        from rexft.eval.report import compare_runs

        try:
            compare_runs([Path(a) for a in args[1:]])
        except RexftError as err:
            print(f"rexft: error: {err}", file=sys.stderr)
            return 2
        return 0
    if command == "harness":  # lm-eval's own command line, not a Hydra config
        return _load("rexft.harness.run:main")(args)
    if command == "sweep":
        return _sweep_command(args)
    if command not in COMMANDS:
        hint = difflib.get_close_matches(command, COMMANDS, n=1)
        print(f"rexft: error: unknown command '{command}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
              + f"; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if "-h" in args or "--help" in args:
        print(usage(command))
        return 0
    print_only = "--print-config" in args
    overrides = [a for a in args if a != "--print-config"]
    if any(a in ("-m", "--multirun") for a in overrides):
        try:  # by name, like the stages: multirun builds on this module, the CLI stays the graph's top
            return _load("rexft.multirun:multirun")(command, [a for a in overrides if a not in ("-m", "--multirun")])
        except ConfigError as err:
            print(f"rexft: error: {err}", file=sys.stderr)
            return 2
    try:
        cfg, resolved = compose(overrides)
    except ConfigError as err:
        print(f"rexft: error: {err}", file=sys.stderr)
        return 2
    from omegaconf import OmegaConf

    if print_only:
        print(OmegaConf.to_yaml(resolved), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        run_command(command, cfg, OmegaConf.to_yaml(resolved))
    except RexftError as err:
        print(f"rexft: error: {err}", file=sys.stderr)
        return 2
    return 0


def run_command(command: str, cfg: RunConfig, yaml_text: str) -> None:
    """The command's stages (those it needs first, then itself), each after writing the resolved config; a
    failure leaves the run directory's configs as they were."""
    from rexft.rundir import restored_on_error, save_resolved_config

    if command == "train" and prior_ablation(cfg):
        log.info("prior=none: the trex adapter trains without a cluster prior (adapter.use_prior=false, "
                 "the 'intuition' ablation)")
    with restored_on_error(cfg.path):
        for stage in _stages(command, cfg):
            save_resolved_config(cfg, yaml_text, stage)
            _stage(stage)(cfg)


def _sweep_command(args: list[str]) -> int:
    """``rexft sweep report DIR [--metric KEY]``: the table and plot of a sweep's jobs."""
    from rexft.config import METRICS
    from rexft.sweep import sweep_report

    if not args or args[0] != "report" or len(args) < 2 or args[1].startswith("-"):
        print("usage: rexft sweep report SWEEP_DIR [--metric " + "|".join(("auto",) + tuple(METRICS)) + "]",
              file=sys.stderr)
        return 2
    metric = args[args.index("--metric") + 1] if "--metric" in args[:-1] else "auto"
    if metric not in ("auto",) + tuple(METRICS):
        print(f"rexft: error: --metric '{metric}' is not one of auto, {', '.join(METRICS)}", file=sys.stderr)
        return 2
    try:
        sweep_report(Path(args[1]), metric)
    except RexftError as err:
        print(f"rexft: error: {err}", file=sys.stderr)
        return 2
    return 0


def _stages(command: str, cfg: RunConfig) -> Iterator[str]:
    """The command, preceded by what it needs and the run directory lacks, computed exactly as the commands
    would: cluster-prior and train run `rexft data` when there is no split record or one made with other data
    settings, and train runs cluster-prior when the prior is missing or was built from other rows. Lazy: each
    check runs once the stage before it has.

    Under a launch (torchrun, accelerate launch) only the main process runs the stages before train: the others
    would write the same files at the same time. They meet it at the trainer's first barrier, once it is done."""
    from rexft.rundir import launch_rank
    from rexft.splits import is_stale

    if command == "train" and launch_rank() != 0:
        yield command
        return
    if command in ("cluster-prior", "train") and is_stale(cfg):
        log.info("no split record for these data settings at %s: running data first", cfg.path / "data")
        yield "data"
    if command == "train":
        from rexft.prior import prior_dir, prior_is_stale
        from rexft.train import uses_prior

        if uses_prior(cfg) and prior_is_stale(cfg):
            log.info("no prior of the training rows at %s: running cluster-prior first", prior_dir(cfg))
            yield "cluster-prior"
    yield command


if __name__ == "__main__":
    sys.exit(main())
