"""Loading the base model and tokenizer: hub id, local directory, GGUF file, or a tiny random LLaMA.

GGUF checkpoints (``model.gguf_file``) are dequantized to float by transformers once and cached as a
safetensors directory beside the GGUF file's cache key, so later runs load in seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from rexft.config import ModelConfig
from rexft.errors import RexftError

log = logging.getLogger(__name__)
TINY = "tiny-random-llama"


def cache_root() -> Path:
    return Path(os.environ.get("REXFT_CACHE", Path.home() / ".cache" / "rexft"))


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + <s>, </s>, <pad>) built in-process: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama_config(cfg: ModelConfig, vocab_size: int):
    from transformers import LlamaConfig

    t = cfg.tiny
    return LlamaConfig(vocab_size=vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                       num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                       num_key_value_heads=t.num_key_value_heads, max_position_embeddings=t.max_position_embeddings,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def tiny_llama(cfg: ModelConfig, vocab_size: int):
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(cfg.tiny.seed)
        return LlamaForCausalLM(tiny_llama_config(cfg, vocab_size))


def _gguf_cache_dir(cfg: ModelConfig) -> Path:
    source = Path(cfg.name_or_path) / cfg.gguf_file
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "converted" / f"{Path(cfg.gguf_file).stem}-{key}"


def resolve_source(cfg: ModelConfig) -> str:
    """Where from_pretrained should read: the converted cache for GGUF, else name_or_path as given."""
    if not cfg.gguf_file:
        return cfg.name_or_path
    source = Path(cfg.name_or_path) / cfg.gguf_file
    if not source.is_file():
        raise RexftError(f"model.gguf_file: {source} does not exist (scripts/fetch_smollm2.sh fetches the demo model)")
    converted = _gguf_cache_dir(cfg)
    if not (converted / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to a cached safetensors copy at %s", source, converted)
        tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, gguf_file=cfg.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, gguf_file=cfg.gguf_file, dtype=torch.float32)
        # The weights are dequantized floats already; transformers still tags the model as GGUF-quantized
        # and refuses to save it, so drop the tag.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = converted.with_name(converted.name + ".tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(converted)
    return str(converted)


def _from_pretrained(loader, cfg: ModelConfig, what: str, **kwargs):
    """from_pretrained with one clear error naming model.name_or_path (offline, typo, gated repo ...)."""
    try:
        return loader.from_pretrained(resolve_source(cfg), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:  # ValueError: huggingface_hub's invalid repo id
        first = str(err).strip().splitlines()[0]
        raise RexftError(f"model.name_or_path={cfg.name_or_path}: cannot load its {what} ({first}); offline, point it at a "
                         "local directory or a GGUF file (model=smollm2_135m), or run scripts/fetch_smollm2.sh") from None


def default_device() -> str:
    """Where rexft runs a model: the GPU where there is one, else the CPU (the one place this is decided)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token (load_tokenizer sets EOS where it has
    none), else 0 (padding is masked, so any id is correct)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def load_tokenizer(cfg: ModelConfig):
    if cfg.name_or_path == TINY:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, cfg, "tokenizer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(name: str, device: str = "cpu") -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below AVX512_CORE_BF16: bf16 matmuls are emulated, slower than float32
_ONEDNN_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpuinfo(field: str) -> str:
    """A field of the first CPU in /proc/cpuinfo (Linux; "" elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == field), "")
    except OSError:
        return ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not)."""
    return set(cpuinfo("flags").split())


def native_bf16(device) -> bool:
    """Whether ``device`` computes bfloat16 matmuls natively (faster than float32): a CUDA GPU with bf16
    support, or a CPU with AVX512-BF16 or AMX whose kernels torch is allowed to use (``ATEN_CPU_CAPABILITY``
    and ``ONEDNN_MAX_CPU_ISA`` can hold it to AVX2). Elsewhere torch emulates bf16, far slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu" or torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        return False
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ONEDNN_WITHOUT_BF16:
        return False
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def machine_summary(probe: bool = True) -> str:
    """One line naming what a benchmark's figures depend on: the CPU (or GPU), torch's kernels, whether bf16
    is native, the library versions, and (``probe``) the float32 matmul rate measured now, so figures from
    two days can be told apart by machine or by library."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"

    cpu = cpuinfo("model name") or platform.processor() or platform.machine()
    device = default_device()
    where = torch.cuda.get_device_name() if device == "cuda" else f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    line = (f"{where}; torch kernels {torch.backends.cpu.get_cpu_capability()}, native bf16 "
            f"{'yes' if native_bf16(device) else 'no'}; " +
            ", ".join(f"{name} {installed(name)}" for name in ("torch", "transformers", "peft", "accelerate")) +
            f"; malloc {'heap kept' if os.environ.get('MALLOC_MMAP_THRESHOLD_') else 'glibc defaults'}")
    if probe:
        line += f"; float32 matmul {matmul_gflops(device):.0f} GFLOP/s"
    return line


def matmul_gflops(device: str = "cpu", n: int = 1024, seconds: float = 0.5) -> float:
    """The float32 matmul rate of ``device`` now (n x n x n, best of repeats for about ``seconds``)."""
    import time

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best, spent = float("inf"), 0.0
    while spent < seconds:
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return 2 * n ** 3 / best / 1e9


def compute_dtype(name: str, model) -> torch.dtype | None:
    """The dtype a pass of ``model`` computes in under autocast (None: the model's own). ``auto``: bfloat16
    where the device computes it natively (``native_bf16``) and the model is in float32, else the model's."""
    weight = next(model.parameters())
    if name != "auto":
        return torch_dtype(name)
    return torch.bfloat16 if weight.dtype == torch.float32 and native_bf16(weight.device) else None


def load_model(cfg: ModelConfig, vocab_size: int | None = None, device: str = "cpu", sharded: bool = False):
    """The frozen base model. ``quantization=nf4`` loads it in 4-bit through bitsandbytes (CUDA, or its CPU
    backend). ``sharded``: it will be FSDP-sharded, so a 4-bit base stores its packed bytes in the compute
    dtype (``bnb_4bit_quant_storage``): FSDP shards floating tensors only and would keep uint8 ones whole."""
    if cfg.name_or_path == TINY:
        return tiny_llama(cfg, vocab_size or len(byte_tokenizer()))
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch_dtype(cfg.dtype, device)}
    if cfg.quantization == "nf4":  # QLoRA: bitsandbytes NF4 base (CUDA, or its CPU backend)
        from transformers import BitsAndBytesConfig

        on_gpu = default_device() == "cuda"
        compute = torch.bfloat16 if on_gpu else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute if sharded else torch.uint8)
        kwargs["device_map"] = {"": torch.cuda.current_device() if on_gpu else "cpu"}
    elif cfg.quantization is not None:
        raise RexftError(f"model.quantization: '{cfg.quantization}' is not one of null, nf4")
    return _from_pretrained(AutoModelForCausalLM, cfg, "weights", **kwargs)


def model_fingerprint(model) -> dict:
    """What an adapter must match to be loaded onto a base model."""
    from torch.distributed.fsdp import FSDPModule

    config = model.config
    # FSDP2's fully_shard swaps the model's class for FSDP<Class>: name the model's own class
    own_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    return {
        "architecture": (getattr(config, "architectures", None) or [own_class.__name__])[0],
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": getattr(config, "vocab_size", None),
    }
