"""Train stage: one loop on Accelerate, from one CPU to multi-GPU nodes (DDP, FSDP2 or DeepSpeed ZeRO-2/3).

    base model (frozen) + adapters -> mixture batches (+ each example's prior) -> AdamW steps
    -> checkpoints/step-N (adapter + optimizer + RNG, atomic) -> adapter/ (final)

Data order is a pure function of (seed, epoch): every process computes the same global order, and
global micro-batch t is split evenly across processes, so N processes with batch b see exactly what one
process with batch N*b sees. The loss of a micro-batch is the sum of its answer-token losses divided by
the answer tokens of the whole optimizer step (all processes, all accumulation steps), so the update
does not depend on how the global batch is split. Resuming replays the same order and restores the RNG
state, so the loss curve after a resume equals the uninterrupted one. A checkpoint holds the gathered
adapter and optimizer state (DDP, FSDP2) and resumes on any number of processes with the same global
batch; DeepSpeed's partitioned ZeRO state resumes on the world size that wrote it.

Only the main process writes to the run directory (the per-rank files of DeepSpeed's ZeRO checkpoint excepted).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import torch

from rexft.adapters import (aux_loss, format_parameter_report, format_targets, inject_adapters, is_adapter_param,
                            parameter_report, routing_stats, save_adapter, set_prior, set_token_mask)
from rexft.config import RunConfig, TrainerConfig, config_root
from rexft.data import (IGNORE_INDEX, PromptFormat, check_dropped, collate, collate_packed, length_grouped_order,
                         pack_rows, tokenize_examples)
from rexft.errors import RexftError
from rexft.modeling import default_device, load_model, load_tokenizer, native_bf16, pad_id
from rexft.prior import ADAPTER_CENTROIDS

log = logging.getLogger(__name__)
MEMORY_KEYS = ("trainer.batch_size (raise trainer.grad_accum to keep the global batch), data.max_length, "
               "trainer.gradient_checkpointing=true, model.quantization=nf4, trainer=zero3")


def uses_prior(cfg: RunConfig) -> bool:
    return cfg.adapter.type == "trex" and cfg.adapter.use_prior


# ------------------------------------------------------------------------------------------ accelerate
def _deepspeed_plugin(cfg: TrainerConfig, num_processes: int, mixed_precision: str):
    from accelerate.utils import DeepSpeedPlugin

    path = Path(cfg.deepspeed)
    if not path.is_absolute() and not path.is_file():
        path = config_root() / "configs" / path
    if not path.is_file():
        raise RexftError(f"trainer.deepspeed: {cfg.deepspeed} not found")
    ds = json.loads(path.read_text())
    # Fill DeepSpeed's "auto" values from the trainer config: the loop feeds batches itself.
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * num_processes
    ds["gradient_clipping"] = cfg.max_grad_norm
    ds["bf16"] = {"enabled": mixed_precision == "bf16"}
    ds["fp16"] = {"enabled": mixed_precision == "fp16"}
    return DeepSpeedPlugin(hf_ds_config=ds)


def resolve_mixed_precision(setting: str, deepspeed: bool = False) -> str:
    """``auto``: bf16 autocast where the device computes bf16 natively (a bf16 GPU, or a CPU with AVX512-BF16
    or AMX), else none. DeepSpeed on a CPU keeps float32 (its CPU bf16 path is not one rexft tests)."""
    if setting != "auto":
        return setting
    device = default_device()
    if device == "cpu" and deepspeed:
        return "no"
    return "bf16" if native_bf16(device) else "no"


def _fsdp_plugin():
    """FSDP2: each decoder block (the model's ``_no_split_modules``) is fully_shard-ed, then the embeddings,
    the tail and the root. Weights stay as loaded on every process until sharded (no rank-0-only loading,
    which a 4-bit base does not support anyway); checkpoints gather the adapter and optimizer state."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          reshard_after_forward=True, cpu_ram_efficient_loading=False,
                                          state_dict_type="FULL_STATE_DICT")


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    trainer = cfg.trainer
    if trainer.fsdp and trainer.deepspeed:
        raise RexftError(f"trainer.fsdp=true and trainer.deepspeed={trainer.deepspeed}: choose one sharding "
                         "(trainer=fsdp or trainer=zero3)")
    on_cpu = default_device() == "cpu"
    mixed_precision = resolve_mixed_precision(trainer.mixed_precision, deepspeed=bool(trainer.deepspeed))
    log.info("mixed precision: %s (trainer.mixed_precision=%s)", mixed_precision, trainer.mixed_precision)
    plugin, timeout = None, timedelta(seconds=trainer.ddp_timeout)
    if trainer.deepspeed and "LOCAL_RANK" not in os.environ:
        raise RexftError(f"trainer.deepspeed={trainer.deepspeed} needs a launcher, even for one process: torchrun "
                         "--nproc_per_node N -m rexft train ... (or accelerate launch, or deepspeed --module rexft)")
    if trainer.deepspeed:
        # DeepSpeed initialises the process group itself (gloo on CPU); Accelerate's cpu=True disables it.
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        state = PartialState(cpu=False, backend="gloo" if on_cpu else None, timeout=timeout)
        plugin = _deepspeed_plugin(trainer, state.num_processes, mixed_precision)
    cpu = on_cpu and plugin is None  # Accelerate forms a gloo process group on CPU only when told so
    report_to = list(trainer.report_to)  # its choices are checked with the config
    if "wandb" in report_to:
        os.environ.setdefault("WANDB_DIR", str(cfg.path))  # W&B's files live in the run directory too
    fsdp = None
    if trainer.fsdp:
        fsdp = _fsdp_plugin() if PartialState(cpu=cpu, timeout=timeout).num_processes > 1 else None
        if fsdp is None:
            log.info("trainer.fsdp: one process, nothing to shard: training unsharded")
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, gradient_accumulation_steps=trainer.grad_accum,
                              deepspeed_plugin=plugin, fsdp_plugin=fsdp, log_with=report_to or None,
                              project_dir=str(cfg.path), kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])
    if fsdp is not None and accelerator.distributed_type != DistributedType.FSDP:
        # Accelerate 1.15 turns FSDP on for accelerator devices only. On CPU gloo processes (tests, CI) the
        # same FSDP2 path is taken by setting the state as Accelerate does on a GPU (both shared states).
        PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = fsdp
        if mixed_precision != "no":
            fsdp.set_mixed_precision(mixed_precision)
    return accelerator


def is_fsdp(accelerator) -> bool:
    return accelerator.distributed_type == "FSDP"


def is_zero3(accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


def gathered_adapter_state(model, accelerator) -> dict[str, torch.Tensor]:
    """Full adapter tensors on every process (ZeRO-3 partitions them: gather first)."""
    unwrapped = accelerator.unwrap_model(model)
    params = {name: p for name, p in unwrapped.named_parameters() if is_adapter_param(name)}
    if is_zero3(accelerator):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {name: p.detach().clone().cpu() for name, p in params.items()}
    if is_fsdp(accelerator):  # FSDP2 parameters are DTensors sharded on dim 0: all-gather each
        return {name: p.full_tensor().detach().cpu().clone() for name, p in params.items()}
    return {name: p.detach().clone().cpu() for name, p in params.items()}


def enable_checkpointing(model) -> None:
    """Activation checkpointing (non-reentrant, so frozen inputs still get adapter gradients)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ------------------------------------------------------------------------------------------------ data
def training_rows(cfg: RunConfig, tokenizer, write_cache: bool = True) -> tuple[list[dict], dict | None]:
    """Tokenized training examples, each with its prior when the adapter uses one (``write_cache``: this
    process may write the tokenization cache in the run directory)."""
    from rexft.prior import priors_for
    from rexft.splits import frozen_mixture

    examples = frozen_mixture(cfg)  # the rows `rexft data` recorded, never re-derived from the sources
    if not examples:
        raise RexftError("the training mixture is empty (data.tasks, data.train_per_task, data.no_train_split)")
    fmt = PromptFormat.for_model(tokenizer, cfg.model)
    encoded = tokenize_examples(examples, tokenizer, fmt, cfg.data.max_length, cfg.path / "data" / "cache",
                                write_cache=write_cache)
    check_dropped(examples, encoded, cfg.data)
    prior_meta = None
    if uses_prior(cfg):  # priors of the whole mixture (the texts cluster-prior embedded: a cache hit)
        priors, prior_meta = priors_for([e.prompt for e in examples], cfg, cfg.adapter.prior_dim)
        encoded = [None if row is None else {**row, "prior": prior} for row, prior in zip(encoded, priors)]
    return [row for row in encoded if row is not None], prior_meta


def step_schedule(n_rows: int, cfg: TrainerConfig, num_processes: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    micro_per_epoch = n_rows // (cfg.batch_size * num_processes)
    steps_per_epoch = micro_per_epoch // cfg.grad_accum
    if steps_per_epoch == 0:
        raise RexftError(f"{n_rows} training examples are fewer than one optimizer step "
                         f"(trainer.batch_size={cfg.batch_size} x grad_accum={cfg.grad_accum} x {num_processes} processes)")
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(steps_per_epoch * cfg.epochs))
    return steps_per_epoch, total


def epoch_order(rows: list[dict], cfg: TrainerConfig, epoch: int, global_batch: int) -> list[int]:
    seed = cfg.seed * 7919 + epoch
    if cfg.group_by_length:
        return length_grouped_order([len(r["input_ids"]) for r in rows], global_batch, seed)
    import random

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return order


def make_optimizer(params, cfg: TrainerConfig):
    if cfg.optimizer == "adamw":  # fused: one kernel for every tensor (CPU and CUDA), ~3.5x the default on CPU
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adafactor":  # transformers' Adafactor at a fixed lr (MoDE's setup), not its relative step
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay, relative_step=False,
                         scale_parameter=False, warmup_init=False)
    import bitsandbytes as bnb  # 8-bit states; CUDA or bitsandbytes' CPU backend

    cls = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg: TrainerConfig, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)


# ----------------------------------------------------------------------------------------- checkpoints
def checkpoint_dirs(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    found = [p for p in folder.glob("step-*") if p.is_dir() and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _state_dict_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # full: every tensor whole (FSDP2 shards gathered), keyed by parameter name, so any world size loads it
    return StateDictOptions(full_state_dict=True, cpu_offload=torch.distributed.is_initialized())


def gathered_optimizer_state(model, optimizer) -> dict:
    """The optimizer state keyed by parameter name, FSDP2 shards gathered (a collective: every process calls it)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_state_dict_options())


def load_gathered_optimizer_state(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_state_dict_options())


def save_checkpoint(cfg: RunConfig, accelerator, model, optimizer, scheduler, step: int, state: dict) -> Path:
    """adapter + optimizer + scheduler + RNG into checkpoints/step-N, via a temporary folder and rename."""
    from safetensors.torch import save_file

    final = cfg.path / "checkpoints" / f"step-{step}"
    tmp = final.with_name(f".{final.name}.tmp")
    adapter = gathered_adapter_state(model, accelerator)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.state.deepspeed_plugin is not None:
        accelerator.save_state(str(tmp / "deepspeed"), exclude_frozen_parameters=True)
    else:
        optimizer_state = gathered_optimizer_state(model, optimizer)
        if accelerator.is_main_process:
            torch.save({"optimizer": optimizer_state, "keyed_by": "name"}, tmp / "optimizer.pt")
    # Every process has written its part (save_state ends with each process's own RNG file): only then
    # may the main process move the folder into place.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(tmp / "adapter.safetensors"))
        torch.save({"scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(cfg.path)[: -cfg.trainer.keep_last or None]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def check_resumable(path: Path, saved: dict, accelerator, cfg: TrainerConfig) -> None:
    """A checkpoint resumes with the same global batch (so step N starts at the same example), on any
    world size; DeepSpeed's partitioned ZeRO state only on the world size that wrote it."""
    world = accelerator.num_processes
    written_by = saved.get("world_size")
    global_batch = cfg.batch_size * cfg.grad_accum * world
    if saved.get("global_batch", global_batch) != global_batch:
        b, w = saved["global_batch"], written_by
        raise RexftError(f"checkpoint {path} was trained with a global batch of {b} ({w} processes); this launch has "
                         f"{global_batch} (trainer.batch_size={cfg.batch_size} x grad_accum={cfg.grad_accum} x {world} "
                         f"processes): set trainer.batch_size x trainer.grad_accum = {b / world:g} per process so the "
                         "data order and the schedule continue")
    if accelerator.state.deepspeed_plugin is not None and written_by not in (None, world):
        raise RexftError(f"checkpoint {path} holds DeepSpeed ZeRO state partitioned over {written_by} processes and "
                         f"this launch has {world}: DeepSpeed loads a partitioned optimizer only on the world size that "
                         f"wrote it. Resume with {written_by} processes, or resume with trainer=default or trainer=fsdp "
                         "from a checkpoint they wrote (the gathered state loads on any world size)")
    if accelerator.state.deepspeed_plugin is not None and not (path / "deepspeed").is_dir():
        raise RexftError(f"checkpoint {path} was not written by DeepSpeed (no deepspeed/ folder); resume it without "
                         "trainer.deepspeed (trainer=default or trainer=fsdp)")
    if accelerator.state.deepspeed_plugin is None and not (path / "optimizer.pt").is_file():
        raise RexftError(f"checkpoint {path} holds DeepSpeed ZeRO state (deepspeed/); resume it with the DeepSpeed "
                         f"config that wrote it (trainer.deepspeed) on {written_by or 'the same number of'} processes")


def load_checkpoint(path: Path, accelerator, model, optimizer, scheduler, cfg: TrainerConfig) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        adapter = load_file(str(path / "adapter.safetensors"))
        state = torch.load(path / "state.pt", weights_only=False)
        trainer_state = json.loads((path / "trainer_state.json").read_text())
    except (SafetensorError, OSError, json.JSONDecodeError, RuntimeError, EOFError) as err:
        raise RexftError(f"checkpoint {path} is corrupt or incomplete ({err}); delete it to resume from an older one") from None
    unwrapped = accelerator.unwrap_model(model)
    own = {n: p for n, p in unwrapped.named_parameters() if is_adapter_param(n)}
    if set(own) != set(adapter):
        raise RexftError(f"checkpoint {path} does not match the adapter config (different adapter parameters)")
    check_resumable(path, trainer_state, accelerator, cfg)
    if accelerator.state.deepspeed_plugin is not None:
        accelerator.load_state(str(path / "deepspeed"), load_module_strict=False)
    else:
        from torch.distributed.tensor import DTensor, distribute_tensor

        with torch.no_grad():
            for name, tensor in adapter.items():
                param = own[name]
                if isinstance(param, DTensor):  # FSDP2: this process's shard of the whole tensor
                    tensor = distribute_tensor(tensor.to(param.dtype), param.device_mesh, param.placements).to_local()
                    param = param.to_local()
                param.copy_(tensor)
        saved = torch.load(path / "optimizer.pt", weights_only=False)
        if saved.get("keyed_by") == "name":
            load_gathered_optimizer_state(model, optimizer, saved["optimizer"])
        else:  # an older checkpoint: the optimizer's own state, keyed by index (DDP or one process)
            optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return trainer_state


# ------------------------------------------------------------------------------------------------ loop
def micro_batches(rows, order, step, cfg: TrainerConfig, rank: int, world: int):
    """The micro-batches of optimizer step ``step`` (0-based within the epoch) for this process, and the
    answer-token count of the whole step across all processes."""
    global_batch = cfg.batch_size * world
    start = step * cfg.grad_accum * global_batch
    step_rows = order[start:start + cfg.grad_accum * global_batch]
    tokens = sum(sum(1 for t in rows[i]["labels"] if t != IGNORE_INDEX) for i in step_rows)
    batches = []
    for micro in range(cfg.grad_accum):
        chunk = step_rows[micro * global_batch:(micro + 1) * global_batch]
        mine = chunk[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
        batches.append([rows[i] for i in mine])
    return batches, tokens


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose logits the loss needs (one before each labelled token, in any row): the model
    computes the vocabulary projection only there (``logits_to_keep`` as an index tensor)."""
    return ((labels[:, 1:] != IGNORE_INDEX).any(0)).nonzero().flatten()


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross entropies; logits (b, P, V) at the kept positions, targets (b, P) the next tokens."""
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


class Trainer:
    """One training run in steps: ``Trainer(cfg)`` sets up the accelerator, model, data, optimizer and schedule
    once; ``resume`` finds the step to start from, ``step`` runs one optimizer step and returns its metrics
    record, ``log`` writes it, ``save`` checkpoints and ``finish`` writes adapter/. :func:`train` is the loop."""

    def __init__(self, cfg: RunConfig):
        from accelerate.utils import set_seed

        self.cfg, tcfg = cfg, cfg.trainer
        self.accelerator = make_accelerator(cfg)
        # Under a launch the main process ran data and cluster-prior before it got here (rexft.cli._stages):
        # no process reads the run directory before that is done.
        self.accelerator.wait_for_everyone()
        set_seed(tcfg.seed)
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.main = self.accelerator.is_main_process

        tokenizer = load_tokenizer(cfg.model)
        model = load_model(cfg.model, len(tokenizer), default_device(),
                           sharded=is_fsdp(self.accelerator))
        model.config.use_cache = False
        inject_adapters(model, cfg.adapter)
        if tcfg.gradient_checkpointing:
            enable_checkpointing(model)
        self.report = parameter_report(model)
        if self.main:
            print(format_targets(model))
            print(format_parameter_report(self.report))

        self.rows, self.prior_meta = training_rows(cfg, tokenizer, write_cache=self.main)
        self.collate = collate
        if cfg.data.packing:
            unpacked = len(self.rows)
            self.rows, self.collate = pack_rows(self.rows, cfg.data.max_length), collate_packed
            log.info("packing: %d examples in %d rows of <= %d tokens", unpacked, len(self.rows), cfg.data.max_length)
        self.steps_per_epoch, self.total_steps = step_schedule(len(self.rows), tcfg, self.world)
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(self.params, tcfg)
        self.scheduler = make_scheduler(optimizer, tcfg, self.total_steps)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if is_fsdp(self.accelerator):  # FSDP2 replaced each parameter by a sharded DTensor: clip those
            self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.pad_id = pad_id(tokenizer)
        self.metrics_path = cfg.path / "metrics.jsonl"
        self.orders: dict[int, list[int]] = {}  # epoch -> the global data order, computed once per epoch
        self.tokens_seen, self.clock = 0, time.perf_counter()
        self.last_loss: float | None = None  # the newest step's loss (unrounded)

    def resume(self) -> int:
        """The step to start from: the newest checkpoint's with trainer.resume, else 0 (an earlier run's
        checkpoints are then removed). metrics.jsonl keeps the records up to that step."""
        cfg, start = self.cfg, 0
        if cfg.trainer.resume:
            found = checkpoint_dirs(cfg.path)
            if not found:
                raise RexftError(f"trainer.resume=true but {cfg.path / 'checkpoints'} holds no checkpoint")
            start = load_checkpoint(found[-1], self.accelerator, self.model, self.optimizer, self.scheduler,
                                    cfg.trainer)["step"]
            log.info("resumed from %s", found[-1])
        elif checkpoint_dirs(cfg.path) and self.main:
            log.warning("%s holds checkpoints of an earlier run; they will be replaced (trainer.resume=true continues it)",
                        cfg.path / "checkpoints")
            shutil.rmtree(cfg.path / "checkpoints", ignore_errors=True)
        if self.main:
            from rexft.rundir import atomic_write_text

            earlier = self.metrics_path.read_text().splitlines() if cfg.trainer.resume and self.metrics_path.exists() else []
            kept = [line for line in earlier if json.loads(line).get("step", 0) <= start]
            atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))
            self.accelerator.init_trackers(cfg.name, config={"lr": cfg.trainer.lr, "adapter": cfg.adapter.type})
        return start

    def step(self, step: int) -> dict:
        """Optimizer step ``step`` (0-based, global): its micro-batches forward and backward, then the update.
        Returns the metrics record of the step (loss summed over processes)."""
        tcfg, accelerator, model = self.cfg.trainer, self.accelerator, self.model
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        order = self.orders.setdefault(epoch, epoch_order(self.rows, tcfg, epoch, tcfg.batch_size * self.world))
        batches, step_tokens = micro_batches(self.rows, order, step_in_epoch, tcfg, self.rank, self.world)
        step_loss = torch.zeros((), device=accelerator.device)
        grad_norm = None
        for batch_rows in batches:
            batch = {k: v.to(accelerator.device) for k, v in self.collate(batch_rows, self.pad_id).items()}
            set_prior(model, batch.pop("prior", None))
            token_mask = batch.pop("token_mask", None)
            set_token_mask(model, token_mask if token_mask is not None else batch["attention_mask"], batch.pop("example_ids", None))
            with accelerator.accumulate(model):
                try:
                    summed = self._backward(batch, step_tokens)
                except torch.cuda.OutOfMemoryError:
                    raise RexftError(f"out of GPU memory at step {step + 1}; reduce memory with {MEMORY_KEYS}") from None
                step_loss += summed.detach() / step_tokens
                self.tokens_seen += int((token_mask if token_mask is not None else batch["attention_mask"]).sum())
                if accelerator.sync_gradients and tcfg.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(self.params, tcfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        loss = float(accelerator.reduce(step_loss, reduction="sum"))
        if not math.isfinite(loss):
            kept = checkpoint_dirs(self.cfg.path)
            raise RexftError(f"non-finite loss ({loss}) at step {step + 1}; stopped. Last good checkpoint: "
                             f"{kept[-1] if kept else 'none'}. Try a lower trainer.lr or trainer.max_grad_norm")
        self.scheduler.step()
        self.last_loss = loss
        done = step + 1
        elapsed = time.perf_counter() - self.clock
        record = {"step": done, "epoch": round(done / self.steps_per_epoch, 4), "loss": round(loss, 6),
                  "lr": self.scheduler.get_last_lr()[0],
                  "tokens_per_s": round(self.tokens_seen * self.world / max(elapsed, 1e-9), 1)}
        if grad_norm is not None:
            record["grad_norm"] = round(float(grad_norm), 6)
        if torch.cuda.is_available():  # what `rexft plan` predicts: weights, adapters, optimizer, activations
            record["peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        if tcfg.routing_stats_every and done % tcfg.routing_stats_every == 0:
            record["routing"] = routing_stats(accelerator.unwrap_model(model))
        return record

    def _backward(self, batch: dict[str, torch.Tensor], step_tokens: int) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the sum of its answer-token losses."""
        keep = loss_positions(batch["labels"])
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                            position_ids=batch["position_ids"], logits_to_keep=keep,
                            use_cache=False).logits  # (b, P, V); no cache: packed rows get a block mask
        summed = token_loss_sum(logits, batch["labels"][:, keep + 1])
        # Normalised by the whole step's answer tokens; x world because gradients are averaged across
        # processes; x grad_accum because accelerate divides each micro loss by it.
        loss = summed / step_tokens * self.world * self.cfg.trainer.grad_accum
        extra = aux_loss(self.model)
        if extra is not None:  # accelerate's 1/grad_accum makes it the mean over micro-batches
            loss = loss + extra
        self.accelerator.backward(loss)
        return summed

    def log(self, record: dict) -> None:
        """metrics.jsonl and the trackers, every trainer.log_every steps and at the last."""
        done = record["step"]
        if self.main and (done % self.cfg.trainer.log_every == 0 or done == self.total_steps):
            with open(self.metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            self.accelerator.log({k: v for k, v in record.items() if k != "routing"}, step=done)

    def save(self, step: int, loss: float | None) -> Path:
        tcfg = self.cfg.trainer
        state = {"loss": loss, "world_size": self.world, "global_batch": tcfg.batch_size * tcfg.grad_accum * self.world}
        return save_checkpoint(self.cfg, self.accelerator, self.model, self.optimizer, self.scheduler, step, state)

    def finish(self, loss: float | None) -> Path:
        """The last checkpoint, then adapter/ (with the resolved config and the prior's centroids)."""
        cfg = self.cfg
        self.save(self.total_steps, loss)
        adapter_dir = cfg.path / "adapter"
        state = gathered_adapter_state(self.model, self.accelerator)
        if self.main:
            metadata = {"prior": self.prior_meta, "parameters": self.report, "trained_steps": self.total_steps,
                        "final_loss": loss}
            save_adapter(self.accelerator.unwrap_model(self.model), adapter_dir, state_dict=state, metadata=metadata)
            if (cfg.path / "config.yaml").exists():
                shutil.copy(cfg.path / "config.yaml", adapter_dir / "config.yaml")
            if self.prior_meta is not None:
                shutil.copy(cfg.path / "prior" / "centroids.safetensors", adapter_dir / ADAPTER_CENTROIDS)
            log.info("adapter saved to %s (final loss %.4f)", adapter_dir, loss)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return adapter_dir


def train(cfg: RunConfig) -> Path:
    """``rexft train``: returns run_dir/adapter (or run_dir/checkpoints after trainer.stop_after_steps)."""
    from tqdm.auto import tqdm

    trainer = Trainer(cfg)
    start, tcfg = trainer.resume(), cfg.trainer
    bar = tqdm(total=trainer.total_steps, initial=start, desc="train", disable=not trainer.main, dynamic_ncols=True)
    trainer.model.train()
    for step in range(start, trainer.total_steps):
        record = trainer.step(step)
        trainer.log(record)
        done = record["step"]
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        if tcfg.save_every and done % tcfg.save_every == 0 and done < trainer.total_steps:
            trainer.save(done, trainer.last_loss)
        if 0 < tcfg.stop_after_steps <= done:
            bar.close()
            trainer.accelerator.end_training()
            log.info("stopped after %d steps (trainer.stop_after_steps)", done)
            return cfg.path / "checkpoints"
    bar.close()
    return trainer.finish(trainer.last_loss)
