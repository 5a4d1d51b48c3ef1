"""Typed configuration: the schema every composed Hydra config is validated against.

Only the CLI touches Hydra/OmegaConf. It composes configs/ + recipes/ + command-line overrides, merges
the result into :class:`RunConfig` (unknown keys and wrong types fail there, naming the key) and hands
plain dataclasses to the stages. Field comments are the documentation of each key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass
class TinyModelConfig:
    """Shape of the random LLaMA built in-process when ``model.name_or_path=tiny-random-llama``."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    seed: int = 0  # weights are drawn from this seed, so every process builds the same model


@dataclass
class ModelConfig:
    name_or_path: str = "tiny-random-llama"  # hub id, local directory, .gguf file, or tiny-random-llama
    gguf_file: Optional[str] = None  # GGUF file inside name_or_path (transformers dequantizes it to float)
    revision: Optional[str] = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bf16 on GPU, fp32 on CPU)
    quantization: Optional[str] = None  # null | nf4 (QLoRA: 4-bit base via bitsandbytes; adapters stay in adapter.dtype)
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
    path: Optional[str] = None  # relative paths are tried in the working directory, then under data.local_dir
    hub: Optional[str] = None  # Hugging Face dataset id, read with datasets.load_dataset
    subset: Optional[str] = None  # hub config name
    train_split: Optional[str] = "train"  # split name (hub) or file name in `path` (a folder); null: eval only
    validation_split: Optional[str] = "validation"  # absent or null: a seeded `holdout` share of train is held out
    holdout: float = 0.1  # share of each task's train records held out for evaluation when there is no validation split
    # Column map: format field -> the records' column (defaults: the field's own name). Fields per format:
    #   instruction: instruction, input (optional), output (a string, or a list of references), system (optional)
    #   chat: messages (OpenAI {role, content} or ShareGPT {from, value} turns), system (optional)
    #   choice: question, options (a list column, or a list of columns), answer (index, letter or option text),
    #           context (optional passage, trimmed first when too long)
    columns: dict[str, Any] = field(default_factory=dict)
    task_column: Optional[str] = None  # one task per distinct value of this column (null: one task named like the source)
    include: Optional[list[str]] = None  # with task_column: keep only these tasks
    exclude: list[str] = field(default_factory=list)  # with task_column: drop these tasks
    max_tasks: Optional[int] = None  # with task_column: keep the first N tasks in file order (after include / exclude)
    template: str = "{instruction}\n\n{input}"  # instruction: the user prompt; {input} is trimmed first when too long
    template_no_input: str = "{instruction}"  # instruction: the prompt of a record whose input is empty
    system: Optional[str] = None  # a system text for every example (a `system` column wins)
    train_per_task: Optional[int] = None  # caps for these tasks (null: data.train_per_task / data.eval_per_task)
    eval_per_task: Optional[int] = None


@dataclass
class DataConfig:
    tasks: list[str] = field(default_factory=list)  # built-in task names (rexft/tasks/*.py) and names of data.sources
    # The user's tasks declared in config: name -> TaskSpec. An open dict for Hydra (so `+data.sources.x.path=...`
    # works); the CLI checks each entry against TaskSpec and hands the stages TaskSpec objects.
    sources: dict[str, Any] = field(default_factory=dict)
    local_dir: Optional[str] = None  # folder of <task>/<split>.jsonl; null reads the Hugging Face hub
    max_length: int = 2048  # tokens; passages are trimmed first; an example whose answer or target cannot fit is dropped
    max_dropped_fraction: float = 0.1  # stop if more than this share of the training examples cannot fit max_length
    train_per_task: Optional[int] = None  # cap on training examples per task (null: all)
    eval_per_task: Optional[int] = None  # cap on evaluation examples per task (null: all)
    mixture: str = "proportional"  # proportional | temperature (sampling prob ~ n_task ** (1/T))
    temperature: float = 1.0  # T for mixture=temperature
    mixture_size: Optional[int] = None  # examples drawn for mixture=temperature (null: sum of caps)
    # Tasks with no train split: train on the first `validation_train_fraction` of a seeded shuffle
    # of the validation split and evaluate on the disjoint rest ("split_validation"), or leave the
    # task out of training ("skip").
    no_train_split: str = "split_validation"
    validation_train_fraction: float = 0.5
    packing: bool = False  # training only: several examples per row of max_length tokens (batch_size counts rows)
    seed: int = 0


@dataclass
class AdapterConfig:
    type: str = "trex"  # lora | molora | hydralora | trex | mode (a module under rexft/adapters/)
    target_modules: list[str] = field(default_factory=lambda: [".*"])  # regexes on module names
    exclude_modules: list[str] = field(default_factory=lambda: ["lm_head"])  # regexes; win over targets
    r: int = 8  # rank (lora, molora, hydralora, mode)
    alpha: float = 16.0  # scaling = alpha / r (alpha / sqrt(r) with rslora)
    rslora: bool = False
    dropout: float = 0.0  # dropout on the adapter's input
    num_experts: int = 4  # molora: LoRA experts; hydralora: B heads; mode: up-vector atoms per rank (m)
    top_k: Optional[int] = None  # sparse routing: keep the top-k experts per token (null: dense)
    # trex
    mode: str = "rank1_flex"  # rank1 (r1 = r2 = r, diagonal routing) | rank1_flex (full r1 x r2)
    r1: int = 4  # down vectors
    r2: int = 8  # up vectors
    c_token: float = 32.0  # weight of the token router in M
    c_task: float = 4.0  # weight of the semantic prior in M
    s: float = 100.0  # sharpness of omega = sigmoid(s * w_omega) and gate = sigmoid(s * w_gate)
    use_prior: bool = True  # false: the "intuition" ablation
    use_router: bool = True  # false: prior-only routing
    prior_dim: int = 32  # k, the number of cluster centroids the prior has
    aux_loss_weight: float = 0.0  # load-balancing loss weight (mixtures)
    dtype: str = "float32"  # adapter parameter dtype


@dataclass
class PriorConfig:
    enabled: bool = True  # compute and use cluster priors (trex with use_prior)
    embedder: str = "all-MiniLM-L6-v2"  # encoder id or path; the PyPI-shipped copy is found offline
    k: int = 32  # k-means clusters
    batch_size: int = 64
    max_length: int = 256  # embedder tokens per prompt
    kmeans_iters: int = 100
    kmeans_restarts: int = 3
    kmeans_tol: float = 1e-4
    backend: str = "auto"  # auto | torch | faiss
    seed: int = 0


@dataclass
class TrainerConfig:
    epochs: float = 1.0
    max_steps: int = -1  # optimizer steps; > 0 overrides epochs
    lr: float = 5e-5
    weight_decay: float = 0.0
    scheduler: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    batch_size: int = 4  # per device
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16 (auto: bf16 on a bf16 GPU, else no)
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"  # adamw | adafactor (transformers', fixed lr) | adamw_8bit | paged_adamw_8bit (bitsandbytes 8-bit states)
    seed: int = 0
    deepspeed: Optional[str] = None  # path of a DeepSpeed JSON config, relative paths from configs/
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end)
    keep_last: int = 2  # checkpoints kept
    resume: bool = False  # continue from the newest checkpoint in run_dir/checkpoints
    log_every: int = 1
    routing_stats_every: int = 50  # steps between routing statistics in metrics.jsonl (0: off)
    report_to: list[str] = field(default_factory=list)  # tensorboard | wandb
    group_by_length: bool = True  # batches of similar length (less padding)
    stop_after_steps: int = -1  # testing aid: exit after this many steps without the final save


@dataclass
class EvalConfig:
    tasks: Optional[list[str]] = None  # subset of data.tasks, by source or task name (null: all)
    unseen_tasks: list[str] = field(default_factory=list)  # built-ins or data.sources evaluated but never trained on
    limit: Optional[int] = None  # examples per task
    protocol: str = "first_token"  # choice tasks: first_token | loglik (generative tasks always use generate)
    # generate protocol (generative tasks): greedy unless do_sample; rows stop at EOS, a stop string or max_new_tokens
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)  # stop strings (the text is cut before the first one)
    do_sample: bool = False
    temperature: float = 1.0  # with do_sample
    top_p: float = 1.0  # with do_sample
    num_beams: int = 1
    bootstrap: int = 1000  # bootstrap resamples for the 95% intervals of ROUGE-L / exact match
    restricted: bool = True  # first_token: argmax over option letters (false: greedy over the vocabulary)
    batch_size: int = 16
    model: Optional[str] = None  # evaluate this merged export instead of base (+ run_dir adapter)
    use_adapter: bool = True  # false: evaluate the base model
    routing_layer: int = -1  # layer index for the routing heatmap (-1: last)
    output: str = "eval"  # sub-folder of run_dir for results


@dataclass
class ExportConfig:
    mode: str = "auto"  # auto | merged | per_task | per_cluster | adapter (auto: merged for lora, per_task else)
    dtype: str = "auto"  # auto (the base model's) | float32 | bfloat16 | float16
    overwrite: bool = False
    merged_models: bool = False  # per_task/per_cluster: also write a merged full model per task
    fidelity: bool = True  # per_task / per_cluster: eval each static export vs the dynamic adapter on its examples
    fidelity_limit: Optional[int] = 64  # evaluation examples per task for the fidelity table
    route_examples: int = 64  # training examples per task / cluster whose routes are averaged into its export
    max_shard_size: str = "2GB"


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

    @property
    def path(self) -> Path:
        return Path(self.run_dir)


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
