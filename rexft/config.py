"""Typed configuration: the schema every composed Hydra config is validated against.

Only the CLI touches Hydra. It composes configs/ + recipes/ + command-line overrides, merges the result
into :class:`RunConfig` (unknown keys and wrong types fail there, naming the key), checks every value
against the range its field declares here (:func:`range_violations`) and hands plain dataclasses to the
stages. Field comments are the documentation of each key. OmegaConf's structured merge also reads a
spec back (:func:`task_specs`; ``rexft.rundir.saved_config``): stages get dataclasses, never its objects.

Every numeric and list field states its valid range with :func:`bounded` (or says it has none with
:func:`unbounded`), and every field with a fixed set of values states it with :func:`one_of` (a list of
such values, ``trainer.report_to``, states its items' choices); tests/test_config_checks.py fails for a
numeric or list field that does none of these, so a key added later cannot skip the check. Rules between
keys (top_k against the expert count, ...) live in the CLI.
"""

from __future__ import annotations

import dataclasses
import functools
import pkgutil
import typing
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from rexft.errors import RexftError


class ConfigError(RexftError):
    """A user mistake in the composed configuration: printed as one line, exit status 2."""


def config_root() -> Path:
    """Folder holding configs/ and recipes/: inside the installed wheel, else the checkout."""
    packaged = Path(__file__).parent / "_configs"
    if (packaged / "configs").is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def adapter_types() -> list[str]:
    """The adapter registry is the file tree: every module under rexft/adapters/ but their shared base."""
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent / "adapters")]) if m.name != "base")


DTYPES = ("float32", "bfloat16", "float16")


# ------------------------------------------------------------------------------------------------ ranges
@dataclass(frozen=True)
class Range:
    """The values a config key accepts: numeric bounds, a minimum list length, and sentinels that are
    valid as they are (``allow``: -1 for "off", None for "no cap"). No bound at all: any value."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    min_items: Optional[int] = None
    allow: tuple = ()

    @property
    def unbounded(self) -> bool:
        return (self.ge, self.gt, self.le, self.lt, self.min_items) == (None,) * 5

    def check(self, value: Any) -> bool:
        if value in self.allow:
            return True
        if value is None:  # only a sentinel when allowed
            return self.unbounded
        if self.min_items is not None:
            return len(value) >= self.min_items
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        if self.min_items is not None:
            bound = "non-empty" if self.min_items == 1 else f"at least {self.min_items} items"
        else:
            low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
            high = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
            if low and high:
                bound = f"in {low}, {high}"
            elif low:
                bound = (">= " if low[0] == "[" else "> ") + low[1:]
            elif high:
                bound = ("<= " if high[-1] == "]" else "< ") + high[:-1]
            else:
                bound = "any value"
        sentinels = ["null" if a is None else _num(a) for a in self.allow]
        return " or ".join(sentinels + [bound])


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def bounded(default: Any = MISSING, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, min_items: int | None = None, default_factory: Any = MISSING, allow: tuple = ()):
    """A dataclass field whose valid values are stated beside its documentation:
    ``lr: float = bounded(5e-5, gt=0)``, ``top_k: Optional[int] = bounded(None, ge=1, allow=(None,))``,
    ``tasks: list[str] = bounded(default_factory=list, min_items=1)``. The CLI rejects anything else
    with one line naming the key, the value and the range, before any work starts."""
    rng = Range(ge=ge, gt=gt, le=le, lt=lt, min_items=min_items, allow=tuple(allow))
    if rng.unbounded:
        raise ValueError("bounded() without a bound: use unbounded() to say a key takes any value")
    return field(default=default, default_factory=default_factory, metadata={"range": rng})


def unbounded(default: Any = MISSING, *, default_factory: Any = MISSING):
    """A numeric or list field that deliberately takes any value (the schema test tells it from a forgotten range)."""
    return field(default=default, default_factory=default_factory, metadata={"range": Range()})


def one_of(default: Any = MISSING, *, choices: tuple | Callable[[], list], default_factory: Any = MISSING):
    """A string field (or list of strings) whose valid values are stated beside its documentation:
    ``scheduler: str = one_of("cosine", choices=("cosine", "linear", "constant"))``. ``choices`` may be a
    function returning them, for registries the file tree holds (``adapter.type``: the modules under
    rexft/adapters/). The CLI rejects anything else with one line naming the key and the valid choices."""
    return field(default=default, default_factory=default_factory, metadata={"choices": choices})


def valid_choices(f: dataclasses.Field) -> list | None:
    """The values a field declared with :func:`one_of` accepts (None: the field declares none)."""
    choices = f.metadata.get("choices")
    return list(choices() if callable(choices) else choices) if choices is not None else None


def choice_violations(cfg: "RunConfig") -> list[tuple[str, Any, list]]:
    """(key, value, valid choices) of every value outside its field's choices, in schema order (a list
    field's items are checked one by one)."""
    found = []
    for key, f, _ in schema_fields(type(cfg)):
        valid = valid_choices(f)
        if valid is None:
            continue
        value = _value_at(cfg, key)
        found += [(key, item, valid) for item in (value if isinstance(value, list) else [value]) if item not in valid]
    return found


def _value_at(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def needs_range(annotation: Any) -> bool:
    """Numbers (bool excepted) and lists, Optional or not, must declare a range."""
    kind = annotation
    if typing.get_origin(annotation) is typing.Union:  # Optional[X] is Union[X, None]
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        kind = args[0] if len(args) == 1 else annotation
    return kind in (int, float) or typing.get_origin(kind) is list


def schema_fields(cls: type = None, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type) of every leaf key of the schema, nested dataclasses walked."""
    cls = cls or RunConfig
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from schema_fields(kind, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, kind


def range_violations(cfg: "RunConfig") -> list[tuple[str, Any, Range]]:
    """(key, value, range) of every value outside the range its field declares, in schema order."""
    found = []
    for key, f, _ in schema_fields(type(cfg)):
        rng = f.metadata.get("range")
        value = _value_at(cfg, key)
        if rng is not None and not rng.check(value):
            found.append((key, value, rng))
    return found


# ------------------------------------------------------------------------------------------------ schema
@dataclass
class TinyModelConfig:
    """Shape of the random LLaMA built in-process when ``model.name_or_path=tiny-random-llama``."""

    hidden_size: int = bounded(64, ge=1)  # a multiple of num_attention_heads
    intermediate_size: int = bounded(128, ge=1)
    num_hidden_layers: int = bounded(2, ge=1)
    num_attention_heads: int = bounded(4, ge=1)  # a multiple of num_key_value_heads
    num_key_value_heads: int = bounded(2, ge=1)
    max_position_embeddings: int = bounded(1024, ge=1)
    seed: int = bounded(0, ge=0)  # weights are drawn from this seed, so every process builds the same model


@dataclass
class ModelConfig:
    name_or_path: str = "tiny-random-llama"  # hub id, local directory, .gguf file, or tiny-random-llama
    gguf_file: Optional[str] = None  # GGUF file inside name_or_path (transformers dequantizes it to float)
    revision: Optional[str] = None
    dtype: str = one_of("auto", choices=("auto",) + DTYPES)  # auto: bf16 on GPU, fp32 on CPU
    quantization: Optional[str] = one_of(None, choices=(None, "nf4"))  # null | nf4 (QLoRA: 4-bit base via bitsandbytes; adapters stay in adapter.dtype)
    use_chat_template: bool = True  # use the tokenizer's chat template when it has one
    plain_template: str = "{prompt}\nAnswer:"  # prompt format when there is no chat template
    trust_remote_code: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class TaskSpec:
    """A user's task (or a family of tasks) declared in config, no code: a format, a source, a column map.

    Declared under ``data.sources.<name>`` (a file under configs/data/, a recipe, or the command line) and
    selected by listing ``<name>`` in ``data.tasks``, beside built-in task names. The README's "Your own
    data" section has a complete example for each format.
    """

    format: str = "instruction"  # instruction (prompt -> response) | chat (messages) | choice (multiple choice)
    # Source: a local file (.jsonl .json .csv .parquet) or a folder of split files, and/or a hub dataset.
    # With both, `path` is read when data.local_dir is set (offline) and `hub` when data.local_dir=null.
    # Relative paths are tried in the working directory, under data.local_dir, then beside the recipe file that sets them.
    # A folder holds split files named as `datasets` names splits: train.jsonl, validation.csv, dev.json, val.parquet ...
    path: Optional[str] = None
    hub: Optional[str] = None  # Hugging Face dataset id, read with datasets.load_dataset
    subset: Optional[str] = None  # hub config name
    train_split: Optional[str] = "train"  # split name (hub) or file name in `path` (a folder); null: eval only
    validation_split: Optional[str] = "validation"  # absent or null: a seeded `holdout` share of train is held out
    holdout: float = bounded(0.1, gt=0, lt=1)  # share of each task's train records held out for evaluation when there is no validation split
    # Column map: format field -> the records' column (defaults: the field's own name). Fields per format:
    #   instruction: instruction, input (optional), output (a string, or a list of references), system (optional)
    #   chat: messages (OpenAI {role, content} or ShareGPT {from, value} turns), system (optional)
    #   choice: question, options (a list column, or a list of columns), answer (see answer_format),
    #           context (optional passage, trimmed first when too long)
    columns: dict[str, Any] = field(default_factory=dict)
    # choice: how an answer names the gold option: index (0-based number) | letter (A, B, ...) | text (an option's
    # exact text) | auto (whichever reading applies; an answer whose readings point at different options is an error)
    answer_format: str = one_of("auto", choices=("auto", "index", "letter", "text"))
    encoding: str = "utf-8"  # text encoding of .jsonl / .json / .csv files (e.g. cp1252, latin-1)
    task_column: Optional[str] = None  # one task per distinct value of this column (null: one task named like the source)
    include: Optional[list[str]] = bounded(None, min_items=1, allow=(None,))  # with task_column: keep only these tasks
    exclude: list[str] = unbounded(default_factory=list)  # with task_column: drop these tasks
    max_tasks: Optional[int] = bounded(None, ge=1, allow=(None,))  # with task_column: keep the first N tasks in file order (after include / exclude)
    template: str = "{instruction}\n\n{input}"  # instruction: the user prompt; {input} is trimmed first when too long
    template_no_input: str = "{instruction}"  # instruction: the prompt of a record whose input is empty
    system: Optional[str] = None  # a system text for every example (a `system` column wins)
    train_per_task: Optional[int] = bounded(None, ge=1, allow=(None,))  # caps for these tasks (null: data.train_per_task / data.eval_per_task)
    eval_per_task: Optional[int] = bounded(None, ge=1, allow=(None,))


@dataclass
class DataConfig:
    tasks: list[str] = bounded(default_factory=list, min_items=1)  # built-in task names (rexft/tasks/*.py) and names of data.sources
    # The user's tasks declared in config: name -> TaskSpec. An open dict for Hydra (so `+data.sources.x.path=...`
    # works); the CLI checks each entry against TaskSpec (keys, types and ranges) and hands the stages TaskSpec objects.
    sources: dict[str, Any] = field(default_factory=dict)
    local_dir: Optional[str] = None  # folder of <task>/<split>.jsonl; null reads the Hugging Face hub
    # How the built-in tasks are prompted: chat (question and lettered options in the chat template, the letter
    # is the answer) | harness (lm-evaluation-harness's zero-shot formats, "...\nAnswer:" and each option as a
    # space-led continuation; scored with eval.protocol=loglik). rexft/tasks/common.py describes both.
    prompt_style: str = one_of("chat", choices=("chat", "harness"))
    max_length: int = bounded(2048, ge=1)  # tokens; context is trimmed first; an example whose answer or target cannot fit is dropped
    max_dropped_fraction: float = bounded(0.1, ge=0, le=1)  # stop if more than this share of the training examples cannot fit max_length
    train_per_task: Optional[int] = bounded(None, ge=1, allow=(None,))  # cap on training examples per task (null: all)
    eval_per_task: Optional[int] = bounded(None, ge=1, allow=(None,))  # cap on evaluation examples per task (null: all)
    mixture: str = one_of("proportional", choices=("proportional", "temperature"))  # (sampling prob ~ n_task ** (1/T))
    temperature: float = bounded(1.0, gt=0)  # T for mixture=temperature
    # examples drawn for mixture=temperature (null: the sum of the caps)
    mixture_size: Optional[int] = bounded(None, ge=1, allow=(None,))
    # Tasks with no train split (built-ins and sources alike; rexft/splits.py fallback_split is the one policy):
    # train on the first `validation_train_fraction` of a seeded shuffle of the validation split and evaluate
    # on the disjoint rest ("split_validation"), or leave the task out of training ("skip"). A source whose
    # train_split is null is evaluated only. Open interval: 0 would train on nothing, 1 evaluate on nothing.
    no_train_split: str = one_of("split_validation", choices=("split_validation", "skip"))
    validation_train_fraction: float = bounded(0.5, gt=0, lt=1)
    packing: bool = False  # training only: several examples per row of max_length tokens (batch_size counts rows)
    # The tuning split: this many of each held-in task's training rows (seeded by data.seed, never trained on,
    # disjoint from the evaluation rows) that sweeps score to choose hyperparameters (eval.split=tuning), so
    # that the rows a report shows are never the rows a setting was chosen on. 0: no tuning split.
    tuning_per_task: int = bounded(0, ge=0)
    seed: int = bounded(0, ge=0)


@dataclass
class AdapterConfig:
    type: str = one_of("trex", choices=adapter_types)  # a module under rexft/adapters/: lora, molora, hydralora, trex, mode
    target_modules: list[str] = bounded(default_factory=lambda: [".*"], min_items=1)  # regexes on module names
    exclude_modules: list[str] = unbounded(default_factory=lambda: ["lm_head"])  # regexes; win over targets ([]: none)
    r: int = bounded(8, ge=1)  # rank (lora, molora, hydralora, mode)
    alpha: float = bounded(16.0, gt=0)  # scaling = alpha / r (alpha / sqrt(r) with rslora)
    rslora: bool = False
    dropout: float = bounded(0.0, ge=0, lt=1)  # dropout on the adapter's input
    num_experts: int = bounded(4, ge=1)  # molora: LoRA experts; hydralora: B heads; mode: up-vector atoms per rank (m)
    # Sparse routing: keep the top-k experts per token (null: dense). At most the adapter's expert count
    # (see expert_count), checked by the CLI.
    top_k: Optional[int] = bounded(None, ge=1, allow=(None,))
    # trex
    mode: str = one_of("rank1_flex", choices=("rank1", "rank1_flex"))  # rank1: r1 = r2 = r, diagonal routing; rank1_flex: full r1 x r2
    r1: int = bounded(4, ge=1)  # down vectors
    r2: int = bounded(8, ge=1)  # up vectors
    c_token: float = bounded(32.0, ge=0)  # weight of the token router in M
    c_task: float = bounded(4.0, ge=0)  # weight of the semantic prior in M
    s: float = bounded(100.0, gt=0)  # sharpness of omega = sigmoid(s * w_omega) and gate = sigmoid(s * w_gate)
    use_prior: bool = True  # false: the "intuition" ablation (prior=none implies it)
    use_router: bool = True  # false: prior-only routing
    prior_dim: int = bounded(32, ge=1)  # k, the number of cluster centroids the prior has (= prior.k)
    aux_loss_weight: float = bounded(0.0, ge=0)  # load-balancing loss weight (mixtures)
    dtype: str = one_of("float32", choices=DTYPES)  # adapter parameter dtype


@dataclass
class PriorConfig:
    enabled: bool = True  # compute and use cluster priors (trex with use_prior); false (prior=none): no prior
    embedder: str = "all-MiniLM-L6-v2"  # encoder id or path; the PyPI-shipped copy is found offline
    k: int = bounded(32, ge=2)  # k-means clusters (one cluster would give every example the same prior)
    batch_size: int = bounded(64, ge=1)
    max_length: int = bounded(256, ge=1)  # embedder tokens per prompt
    kmeans_iters: int = bounded(100, ge=1)
    kmeans_restarts: int = bounded(3, ge=1)
    kmeans_tol: float = bounded(1e-4, ge=0)
    backend: str = one_of("auto", choices=("auto", "torch", "faiss"))  # k-means (auto: faiss when installed)
    seed: int = bounded(0, ge=0)


@dataclass
class TrainerConfig:
    epochs: float = bounded(1.0, ge=0)  # fractions allowed; at least one optimizer step is taken
    max_steps: int = bounded(-1, ge=1, allow=(-1,))  # optimizer steps; overrides epochs (-1: off)
    lr: float = bounded(5e-5, gt=0)
    weight_decay: float = bounded(0.0, ge=0)
    scheduler: str = one_of("cosine", choices=("cosine", "linear", "constant"))
    warmup_steps: int = bounded(0, ge=0)
    batch_size: int = bounded(4, ge=1)  # per device
    grad_accum: int = bounded(1, ge=1)
    max_grad_norm: float = bounded(1.0, ge=0)  # gradient clipping (0: off)
    mixed_precision: str = one_of("auto", choices=("auto", "no", "bf16", "fp16"))  # auto: bf16 where computed natively (GPU, AVX512-BF16/AMX CPU)
    gradient_checkpointing: bool = False
    # adafactor: transformers', at a fixed lr; adamw_8bit / paged_adamw_8bit: bitsandbytes' 8-bit states
    optimizer: str = one_of("adamw", choices=("adamw", "adafactor", "adamw_8bit", "paged_adamw_8bit"))
    seed: int = bounded(0, ge=0)
    deepspeed: Optional[str] = None  # path of a DeepSpeed JSON config, relative paths from configs/
    # FSDP2 through Accelerate (trainer=fsdp): fully_shard each decoder block, so the frozen base is sharded
    # across processes and gathered one block at a time; adapters train as plain (sharded) parameters
    fsdp: bool = False
    # seconds a process of a launch waits for the others at a collective (transformers' ddp_timeout), the main
    # process's data and cluster-prior stages included: the others wait for those before training
    ddp_timeout: int = bounded(1800, gt=0)
    save_every: int = bounded(0, ge=0)  # optimizer steps between checkpoints (0: only at the end)
    keep_last: int = bounded(2, ge=0)  # checkpoints kept (0: all)
    resume: bool = False  # continue from the newest checkpoint in run_dir/checkpoints
    log_every: int = bounded(1, ge=1)
    routing_stats_every: int = bounded(50, ge=0)  # steps between routing statistics in metrics.jsonl (0: off)
    report_to: list[str] = one_of(default_factory=list, choices=("tensorboard", "wandb"))  # []: neither
    group_by_length: bool = True  # batches of similar length (less padding)
    # testing aid: exit after this many steps without the final save (-1: off)
    stop_after_steps: int = bounded(-1, ge=1, allow=(-1,))


@dataclass
class EvalConfig:
    tasks: Optional[list[str]] = bounded(None, min_items=1, allow=(None,))  # subset of data.tasks, by source or task name (null: all)
    unseen_tasks: list[str] = unbounded(default_factory=list)  # built-ins or data.sources evaluated but never trained on ([]: none)
    limit: Optional[int] = bounded(None, ge=1, allow=(None,))  # examples per task (null: all)
    protocol: str = one_of("first_token", choices=("first_token", "loglik"))  # choice tasks (generative tasks always use generate)
    # generate protocol (generative tasks): greedy unless do_sample; rows stop at EOS, a stop string or max_new_tokens
    max_new_tokens: int = bounded(64, ge=1)
    stop: list[str] = unbounded(default_factory=list)  # stop strings (the text is cut before the first one; []: none)
    do_sample: bool = False
    temperature: float = bounded(1.0, gt=0)  # with do_sample
    top_p: float = bounded(1.0, gt=0, le=1)  # with do_sample
    num_beams: int = bounded(1, ge=1)
    bootstrap: int = bounded(1000, ge=0)  # bootstrap resamples for the 95% intervals of ROUGE-L / exact match (0: none)
    restricted: bool = True  # first_token: argmax over option letters (false: greedy over the vocabulary)
    batch_size: int = bounded(16, ge=1)  # rows scored, or whose prompts are prefilled, in one forward
    # auto (pool on a CPU, plain elsewhere) | plain (transformers' generate() and cache on length-sorted
    # batches) | pool (a task's shared opening once; rows join and leave a decoding batch): same scores
    engine: str = one_of("auto", choices=("auto", "plain", "pool"))
    # generate, pool engine: rows decoding together; finished rows leave and new ones join every few tokens.
    # The KV cache of this many prompts (plus max_new_tokens) is held at once (null: the device profile's).
    decode_batch_size: Optional[int] = bounded(None, ge=1, allow=(None,))
    # pool engine: overrides of the device profile (rexft/inference/profile.py DeviceProfile: run_cost,
    # call_cost, decode_chunk, decode_batch_size), e.g. {decode_chunk: 8}
    profile: dict[str, int] = field(default_factory=dict)
    model: Optional[str] = None  # evaluate this merged export instead of base (+ run_dir adapter)
    use_adapter: bool = True  # false: evaluate the base model
    # Block index for the routing heatmap, Python-style (-1: the last); an index past the end also
    # means the last block, so any integer is valid.
    routing_layer: int = unbounded(-1)
    output: str = "eval"  # sub-folder of run_dir for results
    # validation: the reported held-out rows (held-in and unseen tasks) | tuning: the tuning split carved from
    # training rows (data.tuning_per_task), what sweeps choose hyperparameters on
    split: str = one_of("validation", choices=("validation", "tuning"))


@dataclass
class ExportConfig:
    mode: str = one_of("auto", choices=("auto", "merged", "per_task", "per_cluster", "adapter"))  # auto: merged for lora, per_task else
    dtype: str = one_of("auto", choices=("auto",) + DTYPES)  # auto: the base model's
    overwrite: bool = False
    merged_models: bool = False  # per_task/per_cluster: also write a merged full model per task
    fidelity: bool = True  # per_task / per_cluster: eval each static export vs the dynamic adapter on its examples
    fidelity_limit: Optional[int] = bounded(64, ge=1, allow=(None,))  # evaluation examples per task for the fidelity table (null: all)
    route_examples: int = bounded(64, ge=1)  # training examples per task / cluster whose routes are averaged into its export
    # the routes' pass computes in (autocast): auto: bfloat16 where the CPU or GPU computes it natively (e.g.
    # AVX512-BF16 / AMX), else the model's dtype
    route_dtype: str = one_of("auto", choices=("auto",) + DTYPES)
    max_shard_size: str = "2GB"
    # per_task / per_cluster: refuse, with one line, what vLLM's multi-LoRA server cannot load (a rank above
    # 512, targets outside the decoder's linear layers); false for adapters meant for PEFT only
    vllm_compatible: bool = True


@dataclass
class ServeConfig:
    """``rexft serve``: an OpenAI-compatible endpoint for a trained run (rexft/serve/)."""

    # local: rexft's engine serves the exact dynamic mixture, each request with its own prior | vllm: a
    # vLLM OpenAI server with every per-cluster / per-task export as a LoRA module, a router in front
    backend: str = one_of("local", choices=("local", "vllm"))
    host: str = "127.0.0.1"  # 0.0.0.0 exposes the endpoint beyond this machine
    port: int = bounded(8000, ge=0, le=65535)  # 0: any free port (printed at start-up)
    api_key: Optional[str] = None  # required as "Authorization: Bearer KEY" on every endpoint but /health (also REXFT_API_KEY)
    max_tokens: int = bounded(256, ge=1)  # a request's default max_tokens, and the most it may ask for
    max_model_len: Optional[int] = bounded(None, ge=16, allow=(None,))  # prompt + max_tokens (null: the model's context)
    route_log: bool = True  # append every request's route to run_dir/serve/routes.jsonl
    # local backend: rows decoding together (requests join and leave the decoding batch every few tokens)
    max_batch: int = bounded(16, ge=1)
    # local backend's engine: pool (requests join and leave the decoding batch every few tokens, streams get
    # text every chunk) | plain (transformers' generate() over the requests waiting when a run starts) |
    # auto: the pool on a CPU, plain elsewhere (the pool's trade-offs are measured on CPUs)
    engine: str = one_of("auto", choices=("auto", "pool", "plain"))
    # vllm backend: the URL of a vLLM OpenAI server already holding the exports (e.g. a deployment with
    # tensor parallelism, or replicas behind a load balancer); null: rexft starts and supervises one
    upstream: Optional[str] = None
    vllm_python: Optional[str] = None  # vLLM's virtual environment (null: REXFT_VLLM_PYTHON, else .venv-vllm/bin/python)
    vllm_port: int = bounded(0, ge=0, le=65535)  # the supervised vLLM server's port (0: a free one)
    vllm_args: list[str] = unbounded(default_factory=list)  # extra arguments for vLLM's server, e.g. ["--tensor-parallel-size", "2"]
    startup_timeout: float = bounded(600.0, gt=0)  # seconds for the supervised vLLM to become healthy


METRICS = {  # a results.json key (rexft eval) -> the direction that is better
    "mean_accuracy": "maximize", "mean_nll": "minimize", "mean_rouge_l": "maximize",
    "mean_exact_match": "maximize", "mean_target_nll": "minimize",
}


@dataclass
class SweepConfig:
    """``rexft <command> -m key=a,b ...`` (Hydra's multirun): what each job runs and returns to the sweeper."""

    # Run after the command in each job, on its trained adapter: tune (score the tuning split into
    # run_dir/tuning/, the job's objective) and / or eval (the reported evaluation, run_dir/eval/)
    then: list[str] = one_of(default_factory=lambda: ["tune"], choices=("tune", "eval"))
    # The tuning split's metric a job returns (results.json key); auto: mean_rouge_l where the held-in tasks
    # are generative, else mean_accuracy. Its direction (max or min) is METRICS's.
    metric: str = one_of("auto", choices=("auto",) + tuple(METRICS))


@dataclass
class PlanConfig:
    """``rexft plan``: the memory plan of a training run on other hardware than this machine's."""

    world_size: int = bounded(1, ge=1)  # processes (GPUs) the run is launched on
    device: str = one_of("auto", choices=("auto", "cuda", "cpu"))  # auto: this machine's (cuda when it has one)


@dataclass
class RunConfig:
    name: str = "default"  # recipes set it; run_dir defaults to runs/<name>
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)

    @property
    def path(self) -> Path:
        return Path(self.run_dir)


def expert_count(adapter: AdapterConfig) -> Optional[int]:
    """How many experts ``adapter.top_k`` chooses among, per adapter type (None: no routing, lora).

    molora: num_experts LoRA experts; hydralora: num_experts B heads; mode: num_experts atoms per rank
    position (the softmax runs over the m atoms of each position); trex: r1*r2 rank-one experts in
    rank1_flex, r in rank1 (diagonal M). Mirrors the routers' widths in rexft/adapters/.
    """
    if adapter.type in ("molora", "hydralora", "mode"):
        return adapter.num_experts
    if adapter.type == "trex":
        return adapter.r1 * adapter.r2 if adapter.mode == "rank1_flex" else adapter.r
    return None


def to_dict(cfg: Any) -> dict:
    return asdict(cfg)


def adapter_config_from(obj: AdapterConfig | dict) -> AdapterConfig:
    """Accept the dataclass or a dict shaped like configs/adapter/*.yaml; unknown keys are an error."""
    if isinstance(obj, AdapterConfig):
        return obj
    known = set(AdapterConfig.__dataclass_fields__)
    unknown = sorted(set(obj) - known)
    if unknown:
        raise ValueError(f"unknown adapter config key(s) {unknown}; valid keys: {sorted(known)}")
    return AdapterConfig(**obj)


def not_a_choice(key: str, value, valid: list) -> ConfigError:
    names = ["null" if v is None else v for v in valid]
    return ConfigError(f"config key '{key}': '{value}' is not one of {', '.join(names)}")


def task_specs(sources: dict) -> dict:
    """data.sources entries as TaskSpec objects; unknown keys and wrong types name the key."""
    import difflib

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    specs = {}
    for name, raw in sources.items():
        if not isinstance(raw, dict):
            raise ConfigError(f"config key 'data.sources.{name}': a task spec is a mapping (format, path/hub, columns, ...)")
        valid = [f.name for f in dataclasses.fields(TaskSpec)]
        for key in raw:
            if key not in valid:
                hint = difflib.get_close_matches(key, valid, n=1)
                raise ConfigError(f"unknown config key 'data.sources.{name}.{key}'"
                                  + (f" (did you mean 'data.sources.{name}.{hint[0]}'?)" if hint else "")
                                  + f"; valid keys of a task spec: {', '.join(valid)}")
        try:
            specs[name] = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TaskSpec), raw))
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None)
            raise ConfigError(f"config key 'data.sources.{name}.{key}': {str(err).strip().splitlines()[0]}") from None
        for key, value, valid in range_violations(specs[name]):
            raise ConfigError(f"config key 'data.sources.{name}.{key}': {value!r} is out of range (must be {valid})")
        for key, value, valid in choice_violations(specs[name]):
            raise not_a_choice(f"data.sources.{name}.{key}", value, valid)
    return specs
