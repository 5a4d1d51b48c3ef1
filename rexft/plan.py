"""Memory plan (``rexft plan``): the expected peak memory of one training process, from the model's config alone.

No weight is loaded or allocated: the model is built from its config (``AutoConfig``; the tiny random LLaMA
from ``model.tiny``) under torch's FakeTensorMode (shapes and dtypes, no storage), the adapters are injected
into it, and one decoder block's forward at ``trainer.batch_size x data.max_length`` is traced to count the
bytes autograd saves for backward. Per device, with N = ``plan.world_size`` processes:

    weights      frozen base parameters x their bytes (nf4: the 4-bit Linear weights with their block scales,
                 the rest in the model's dtype); / N under ZeRO-3 and FSDP
    gathered     ZeRO-3, FSDP: two decoder blocks' full weights at a time (the current one and the prefetched)
    adapter      trainable parameters x adapter.dtype bytes (/ N under ZeRO-3, FSDP); DeepSpeed adds its fp32
                 master partition (/ N)
    gradients    trainable parameters x 4 (/ N under ZeRO-2/3, FSDP); DDP adds its bucket copy
    optimizer    AdamW: two fp32 moments per trainable parameter; 8-bit AdamW: two bytes; Adafactor's factored
                 moments counted as 0 (/ N under ZeRO, FSDP)
    activations  what one block saves x layers (activation checkpointing: each block's input x layers + one
                 block recomputed during backward), + the logits at the answer positions (fp32 logits,
                 log-softmax and their gradient); the peak is at the start of backward

It predicts the peak of live tensor bytes, what CUDA's ``max_memory_allocated`` reports (``peak_mem_mib`` in
metrics.jsonl on a GPU) and what scripts/bench_memory.py measures on a CPU. It leaves out the runtime's
own memory (CUDA context and allocator cache, NCCL buffers; on a CPU the interpreter, the libraries and
malloc's retained pages), DeepSpeed's communication buckets and the tokenized data.
``scripts/bench_memory.py`` prints plan against measured for real runs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rexft.config import RunConfig, config_root
from rexft.errors import RexftError
from rexft.modeling import TINY, byte_tokenizer, default_device, tiny_llama_config, torch_dtype

log = logging.getLogger(__name__)
MIB = 2 ** 20
ANSWER_POSITIONS = 64  # logits are computed only where a row has a label: at most this many positions per row assumed
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + an 8-bit absmax per 64 (double quant) + fp32 per 256 absmax


@dataclass
class MemoryPlan:
    """Bytes per device of one training process (see the module docstring for each line)."""

    model: str
    strategy: str  # single | ddp | zero2 | zero3 | fsdp
    world_size: int
    device: str
    precision: str  # the compute dtype of the activations
    batch_size: int
    seq_len: int
    base_params: int
    adapter_params: int
    weights: int = 0
    gathered: int = 0
    adapter: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.gathered + self.adapter + self.gradients + self.optimizer + self.activations

    def table(self) -> str:
        lines = [f"memory plan: {self.model}, {self.strategy} on {self.world_size} x {self.device}, {self.precision}, "
                 f"batch {self.batch_size} x {self.seq_len} tokens per device",
                 f"  base {self.base_params / 1e9:.3f} B parameters (frozen), adapter {self.adapter_params / 1e6:.3f} M (trainable)"]
        unit, size = ("GiB", 2 ** 30) if self.total >= 2 ** 30 else ("MiB", MIB)
        for name in ("weights", "gathered", "adapter", "gradients", "optimizer", "activations", "total"):
            lines.append(f"  {name:<12} {getattr(self, name) / size:9.2f} {unit}")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def strategy_of(cfg: RunConfig, world_size: int) -> tuple[str, int | None]:
    """(strategy, ZeRO stage) of the trainer config at this world size."""
    if cfg.trainer.fsdp:
        return ("fsdp" if world_size > 1 else "single"), None
    if cfg.trainer.deepspeed:
        path = Path(cfg.trainer.deepspeed)
        if not path.is_absolute() and not path.is_file():
            path = config_root() / "configs" / path
        stage = json.loads(path.read_text()).get("zero_optimization", {}).get("stage", 0)
        return f"zero{stage}", stage
    return ("ddp" if world_size > 1 else "single"), None


def model_config(cfg: RunConfig):
    """The base model's config, read without its weights."""
    if cfg.model.name_or_path == TINY:
        return tiny_llama_config(cfg.model, len(byte_tokenizer()))
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(cfg.model.name_or_path, gguf_file=cfg.model.gguf_file, revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0]
        raise RexftError(f"model.name_or_path={cfg.model.name_or_path}: cannot read its config ({first}); offline, point it "
                         "at a local directory holding its config.json") from None


def _saved_bytes(model, batch: int, seq: int, prior_dim: int | None, padding_mask: bool,
                 autocast: torch.dtype | None = None) -> int:
    """Bytes autograd saves for backward in one decoder block's forward (its weights excluded: they are counted
    as weights), at batch x seq tokens. Runs under FakeTensorMode: nothing is computed or allocated.
    ``padding_mask``: attention gets a (batch, 1, seq, seq) mask as a padded batch does, which on a CPU takes
    SDPA's math path (it saves the attention probabilities); without one, the fused kernels save O(seq).
    ``autocast``: traced under autocast to this dtype (trainer.mixed_precision), as the step runs."""
    from rexft.adapters import set_prior, set_token_mask

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        key = tensor.untyped_storage()._cdata
        if key not in params:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    inner = model.get_decoder()
    dtype = next(p.dtype for p in inner.parameters() if p.is_floating_point())
    hidden = torch.zeros(batch, seq, model.config.hidden_size, dtype=dtype, requires_grad=True)
    positions = torch.arange(seq)[None].expand(batch, seq)
    set_prior(model, None if prior_dim is None else torch.zeros(batch, prior_dim))
    set_token_mask(model, torch.ones(batch, seq, dtype=torch.long))
    embeddings = inner.rotary_emb(hidden, positions) if hasattr(inner, "rotary_emb") else None
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None].expand(batch, 1, seq, seq) if padding_mask else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        inner.layers[0](hidden, attention_mask=mask, position_ids=positions, position_embeddings=embeddings)
    return sum(saved.values())


def memory_plan(cfg: RunConfig, world_size: int | None = None, device: str | None = None) -> MemoryPlan:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    from rexft.adapters import inject_adapters, is_adapter_param
    from rexft.train import resolve_mixed_precision, uses_prior

    world = world_size or cfg.plan.world_size
    device = device or cfg.plan.device
    if device == "auto":
        device = default_device()
    strategy, stage = strategy_of(cfg, world)
    tcfg, quantized = cfg.trainer, cfg.model.quantization == "nf4"
    if cfg.model.name_or_path == TINY:
        weight_dtype = torch.float32  # built in float32 whatever model.dtype says
    elif cfg.model.dtype == "auto":  # as load_model resolves it there (a GPU planned for computes bf16)
        weight_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    else:
        weight_dtype = torch_dtype(cfg.model.dtype)
    if device == "cuda":
        mixed = {"auto": "bf16"}.get(tcfg.mixed_precision, tcfg.mixed_precision)
    else:
        mixed = resolve_mixed_precision(tcfg.mixed_precision, deepspeed=bool(tcfg.deepspeed))
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed, weight_dtype)
    if quantized:
        compute = torch.bfloat16 if device == "cuda" else torch.float32  # bnb_4bit_compute_dtype, as load_model sets it
    config = model_config(cfg)
    config.use_cache = False
    with FakeTensorMode():
        model = AutoModelForCausalLM.from_config(config, dtype=compute)
        inject_adapters(model, cfg.adapter)
        model.train()  # traced without checkpointing: what a block saves when it runs (or is recomputed)
        batch, seq = tcfg.batch_size, cfg.data.max_length
        block_saved = _saved_bytes(model, batch, seq, cfg.adapter.prior_dim if uses_prior(cfg) else None,
                                   padding_mask=device == "cpu",
                                   autocast={"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed))

    named = dict(model.named_parameters())
    trainable = sum(p.numel() for n, p in named.items() if is_adapter_param(n))
    base = {n: p for n, p in named.items() if not is_adapter_param(n)}
    linear_weights = {f"{name}.weight" for name, module in model.named_modules()
                      if isinstance(module, torch.nn.Linear) and not is_adapter_param(f"{name}.weight")}
    output = model.get_output_embeddings()
    head = next((n for n, p in base.items() if output is not None and p is output.weight), None)

    def base_bytes(params: dict) -> float:
        total = 0.0
        for name, p in params.items():
            four_bit = quantized and name in linear_weights and name != head  # transformers keeps lm_head unquantized
            total += p.numel() * (NF4_BYTES if four_bit else torch_dtype_bytes(weight_dtype))
        return total

    layers = config.num_hidden_layers
    block_params = {n: p for n, p in base.items() if ".layers.0." in n}
    shards_params, shards_grads = strategy in ("zero3", "fsdp"), strategy in ("zero2", "zero3", "fsdp")
    shards_optimizer = strategy.startswith("zero") or strategy == "fsdp"
    adapter_bytes = torch_dtype_bytes(torch_dtype(cfg.adapter.dtype))
    plan = MemoryPlan(model=cfg.model.name_or_path if cfg.model.name_or_path != TINY else f"{TINY} {config.hidden_size}x{layers}",
                      strategy=strategy, world_size=world, device=device, precision=str(compute).replace("torch.", ""),
                      batch_size=batch, seq_len=seq, base_params=sum(p.numel() for p in base.values()),
                      adapter_params=trainable)
    plan.weights = int(base_bytes(base) / (world if shards_params else 1))
    if shards_params and world > 1:
        plan.gathered = int(2 * base_bytes(block_params) * (world - 1) / world)
    plan.adapter = int(trainable * adapter_bytes / (world if shards_params else 1))
    if stage is not None:
        plan.adapter += int(trainable * 4 / world)  # DeepSpeed's fp32 master partition
    plan.gradients = int(trainable * 4 / (world if shards_grads else 1))
    if strategy == "ddp":
        plan.gradients += trainable * 4  # DDP's gradient buckets (a copy unless gradient_as_bucket_view)
    per_param = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "adafactor": 0}[tcfg.optimizer]
    plan.optimizer = int(trainable * per_param / (world if shards_optimizer else 1))
    act_bytes = torch_dtype_bytes(compute)
    if tcfg.gradient_checkpointing:
        stored = layers * batch * seq * config.hidden_size * act_bytes + block_saved
    else:
        stored = layers * block_saved
    positions = min(seq, ANSWER_POSITIONS)
    logits = batch * positions * config.vocab_size * 4 * 3
    plan.activations = int(stored + logits)
    if quantized:  # each 4-bit Linear is dequantized to the compute dtype for its matmul, one at a time
        largest = max((p.numel() for n, p in base.items() if n in linear_weights and n != head), default=0)
        plan.activations += largest * act_bytes
        if strategy == "zero3":
            plan.notes.append("ZeRO-3 over a bitsandbytes 4-bit base is not a route rexft tests; FSDP+QLoRA is (trainer=fsdp)")
    plan.notes.append(f"activations at {batch} x {seq} tokens (data.max_length, the longest batch), logits at "
                      f"<= {positions} answer positions per row")
    return plan


def torch_dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan(cfg: RunConfig) -> Path:
    """``rexft plan``: print the memory plan and write it to run_dir/plan.json."""
    from rexft.rundir import write_json

    result = memory_plan(cfg)
    print(result.table())
    return write_json(cfg.path / "plan.json", {**asdict(result), "total": result.total})

