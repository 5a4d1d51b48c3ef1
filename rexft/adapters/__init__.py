"""Adapter injection, per-batch state, parameter report and (de)serialisation.

The adapter types are the modules of this folder (lora.py, molora.py, hydralora.py, trex.py, mode.py);
``adapter.type`` names one. Public API (re-exported from :mod:`rexft`):

    inject_adapters(model, adapter_cfg) -> model    wrap every matching nn.Linear; freeze the rest
    set_prior(model, prior)                         (b, k) or (b, s, k) cluster similarities for this batch
    set_token_mask(model, mask[, examples])         which tokens count in routing statistics (and, for
                                                    packed rows, which example each token belongs to)
    adapter_state_dict(model) -> dict               the rex_* tensors
    save_adapter(model, dir) / load_adapter(model, dir)
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import shutil
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from rexft.adapters.base import AdapterLinear, TokenLayout, is_adapter_param
from rexft.config import AdapterConfig, adapter_config_from, adapter_types
from rexft.errors import RexftError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1
def adapter_class(name: str) -> type[AdapterLinear]:
    if name not in adapter_types():
        raise RexftError(f"unknown adapter type '{name}'; valid types: {', '.join(adapter_types())}")
    module = importlib.import_module(f"rexft.adapters.{name}")
    (cls,) = [c for _, c in inspect.getmembers(module, inspect.isclass)
              if issubclass(c, AdapterLinear) and c.__module__ == module.__name__]
    return cls


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLinear)}


def is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear whose forward is a linear map: nn.Linear itself, a library's drop-in (bitsandbytes'
    4-bit linear), or a model's own subclass whose forward gives one (out,) tensor per token (Falcon's
    FalconLinear), tried once on one token. PhiMoE's router is an nn.Linear subclass whose forward returns
    (logits, weights, experts): not a layer to adapt."""
    if not isinstance(module, nn.Linear):
        return False
    if type(module).forward is nn.Linear.forward or not type(module).__module__.startswith("transformers.models."):
        return True
    weight = module.weight
    if weight.device.type == "meta" or weight.numel() == 0:
        return False
    try:
        with torch.no_grad():
            out = module(weight.new_zeros(1, module.in_features))
    except Exception:  # noqa: BLE001 - any failure means it is not a drop-in linear
        return False
    return torch.is_tensor(out) and out.shape == (1, module.out_features)


def target_names(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Names of the linear layers that ``target_modules`` matches and ``exclude_modules`` does not.
    The output embedding (lm_head, GPT-NeoX's embed_out, ...) is never a target, nor a model's nn.Linear
    subclass whose forward is not a linear map (``is_plain_linear``)."""
    targets = [re.compile(p) for p in cfg.target_modules]
    excludes = [re.compile(p) for p in cfg.exclude_modules]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not is_plain_linear(module) or not name or is_adapter_param(name) or module is head:
            continue
        if any(p.search(name) for p in targets) and not any(p.search(name) for p in excludes):
            names.append(name)
    return names


def inject_adapters(model: nn.Module, adapter_cfg: AdapterConfig | dict) -> nn.Module:
    """Wrap the targeted linear layers in place and make only adapter parameters trainable."""
    cfg = adapter_config_from(adapter_cfg)
    if adapter_layers(model):
        raise RexftError("the model already has adapters injected")
    cls = adapter_class(cfg.type)
    names = target_names(model, cfg)
    if not names:
        conv1d = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if type(m).__name__ == "Conv1D"})
        hint = (f" (its projections {', '.join(conv1d)} are transformers' GPT-2-style Conv1D, which rexft's adapters "
                "do not wrap: they wrap nn.Linear)") if conv1d else ""
        raise RexftError(f"adapter.target_modules {cfg.target_modules} matched no nn.Linear in {type(model).__name__}{hint}")
    for param in model.parameters():
        param.requires_grad_(False)
    layout = TokenLayout()  # every forward records its (b, s) token grid for the adapters (see base.py)
    model.register_forward_pre_hook(layout.record, with_kwargs=True)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        layer = cls(base, cfg).train(model.training)  # new modules would otherwise start in training mode
        layer.layout, layer.name = layout, name
        device = next((p.device for p in base.parameters() if p.device.type != "meta"), None)
        if device is not None:  # adapter weights live beside their base (device_map, 4-bit on GPU)
            for pname, param in layer.named_parameters():
                if is_adapter_param(pname):
                    param.data = param.data.to(device)
        setattr(parent, child, layer)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_param(name))
    model.rexft_adapter_config = cfg
    return model


def set_prior(model: nn.Module, prior: torch.Tensor | None) -> None:
    """Give every adapter this batch's prior, (b, k) per example or (b, s, k) per token (packing)."""
    for layer in adapter_layers(model).values():
        layer.prior = prior


def set_token_mask(model: nn.Module, mask: torch.Tensor | None, examples: torch.Tensor | None = None) -> None:
    """Which tokens count in routing statistics: ``mask`` (b, s), 1 on real tokens (the attention mask).
    ``examples`` (b, s), for packed rows: the index in the batch of each token's example, -1 on padding;
    per-example routing statistics then average over each example's tokens, not over each row's."""
    token_examples = None if examples is None else (examples, int(examples.max()) + 1)
    for layer in adapter_layers(model).values():
        layer.token_mask = mask
        layer.token_examples = token_examples


@contextmanager
def route_logs_paused(model: nn.Module):
    """Forwards inside log no routes (layers whose ``route_log`` is on keep what they had logged)."""
    logging_layers = [layer for layer in adapter_layers(model).values() if layer.route_log is not None]
    logs = [layer.route_log for layer in logging_layers]
    for layer in logging_layers:
        layer.route_log = None
    try:
        yield
    finally:
        for layer, log in zip(logging_layers, logs):
            layer.route_log = log


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    losses = [layer.aux_loss for layer in adapter_layers(model).values() if layer.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def routing_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per mixture layer, from its last forward: normalised routing entropy (1 = uniform) and the
    largest share of routing weight any one expert got."""
    stats = {}
    for name, layer in adapter_layers(model).items():
        if layer.last_route_mean is None:
            continue
        usage = layer.last_route_mean.float().clamp_min(0)
        usage = usage / usage.sum().clamp_min(1e-12)
        entropy = -(usage * usage.clamp_min(1e-12).log()).sum() / max(1e-12, float(torch.log(torch.tensor(float(len(usage))))))
        stats[name] = {"entropy": round(float(entropy), 4), "max_share": round(float(usage.max()), 4)}
    return stats


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if is_adapter_param(name)}


def parameter_report(model: nn.Module) -> dict:
    """Trainable parameters per module type, and against LoRA r=32 on the same targets."""
    per_type: Counter = Counter()
    lora32 = 0
    for name, layer in adapter_layers(model).items():
        kind = name.rsplit(".", 1)[-1]
        per_type[kind] += sum(p.numel() for p in layer.parameters() if p.requires_grad)
        lora32 += 32 * (layer.in_features + layer.out_features)
    total = sum(per_type.values())
    return {"per_module_type": dict(per_type), "trainable": total, "lora_r32": lora32,
            "ratio_vs_lora_r32": round(total / lora32, 4) if lora32 else None}


def format_parameter_report(report: dict) -> str:
    lines = [f"  {k:<14} {v:>12,}" for k, v in report["per_module_type"].items()]
    lines.append(f"  {'total':<14} {report['trainable']:>12,}   "
                 f"({report['ratio_vs_lora_r32']:.1%} of LoRA r=32 = {report['lora_r32']:,} on the same targets)")
    return "trainable adapter parameters:\n" + "\n".join(lines)


# What a fused projection of today's decoders holds: one adapter on it covers these together.
FUSED = {"qkv_proj": "q, k and v", "query_key_value": "q, k and v", "c_attn": "q, k and v", "W_pack": "q, k and v",
         "Wqkv": "q, k and v", "kv_proj": "k and v", "gate_up_proj": "gate and up"}


def format_targets(model: nn.Module) -> str:
    """The wrapped modules grouped by name (block numbers as *), each with its shape and count, fused
    projections said to be one adapter; then the linear layers not wrapped and why."""
    groups: dict[str, list[AdapterLinear]] = {}
    for name, layer in adapter_layers(model).items():
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", name), []).append(layer)
    width = max(map(len, groups), default=0)
    lines = [f"adapters on {sum(map(len, groups.values()))} linear layers, by name:"]
    for pattern, layers in groups.items():
        fused = FUSED.get(pattern.rsplit(".", 1)[-1])
        line = f"  {pattern:<{width}}  x{len(layers):<3} {layers[0].in_features:>6} -> {layers[0].out_features:<6}"
        lines.append((line + f"  fused: one adapter for {fused} together" if fused else line).rstrip())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skipped: dict[str, list[str]] = {}
    wrapped = {id(layer.base) for layers in groups.values() for layer in layers}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module) not in wrapped and not is_adapter_param(name):
            why = ("the output embedding" if module is head else
                   f"{type(module).__name__}: its forward is not a linear map" if not is_plain_linear(module) else
                   "not in adapter.target_modules, or in adapter.exclude_modules")
            skipped.setdefault(why, []).append(re.sub(r"\.\d+\.", ".*.", name))
    for why, names in skipped.items():
        lines.append(f"  not wrapped ({why}): {', '.join(sorted(set(names)))}")
    lines.append("  (leave a module out by name: adapter.exclude_modules='[lm_head,qkv_proj]', regular expressions)")
    return "\n".join(lines)


def save_adapter(model: nn.Module, directory: str | Path, state_dict: dict | None = None, metadata: dict | None = None) -> Path:
    """safetensors weights + adapter_config.json (type, hyperparameters, targets, base-model fingerprint).

    Written to a temporary folder and renamed, so a reader never sees half an adapter.
    """
    from safetensors.torch import save_file

    from rexft.modeling import model_fingerprint

    cfg: AdapterConfig = model.rexft_adapter_config
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in (state_dict or adapter_state_dict(model)).items()}
    config = {"format": "rexft-adapter", "format_version": FORMAT_VERSION, "adapter": asdict(cfg),
              "target_modules": sorted(adapter_layers(model)), "base_model": model_fingerprint(model),
              **(metadata or {})}
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS))
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old)
    else:
        tmp.rename(directory)
    return directory


def read_adapter_config(directory: str | Path) -> dict:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise RexftError(f"no adapter at {directory} ({ADAPTER_CONFIG} is missing)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RexftError(f"{path} is corrupt: {err.msg}") from None
    if config.get("format") != "rexft-adapter":
        raise RexftError(f"{path} is not a rexft adapter config")
    return config


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject (if needed) and load a saved adapter; a different base model or bad tensors is an error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from rexft.modeling import model_fingerprint

    directory = Path(directory)
    config = read_adapter_config(directory)
    expected, actual = config["base_model"], model_fingerprint(model)
    diffs = [f"{k}: adapter {expected.get(k)!r} vs model {actual.get(k)!r}" for k in expected if expected.get(k) != actual.get(k)]
    if diffs:
        raise RexftError(f"adapter at {directory} was trained on a different base model ({'; '.join(diffs)})")
    cfg = adapter_config_from(config["adapter"])
    if not adapter_layers(model):
        inject_adapters(model, cfg)
    try:
        tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError, ValueError) as err:
        raise RexftError(f"{directory / ADAPTER_WEIGHTS} is missing or corrupt ({err})") from None
    own = dict(model.named_parameters())
    own = {k: v for k, v in own.items() if is_adapter_param(k)}
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    misshaped = [f"{k} {tuple(tensors[k].shape)} != {tuple(own[k].shape)}" for k in own
                 if k in tensors and tensors[k].shape != own[k].shape]
    problems = ([f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}"] if missing else []) + \
               ([f"unexpected {unexpected[:5]}"] if unexpected else []) + ([f"mis-shaped {misshaped[:5]}"] if misshaped else [])
    if problems:
        raise RexftError(f"adapter weights at {directory} do not fit the model: {'; '.join(problems)}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor)
    return model
