"""Merge-export stage: turn a trained adapter into artifacts that standard tools load and serve.

    lora      merged/   W' = W + B A folded into the base weights, a plain Hugging Face model directory
              peft/     the adapter in PEFT format (PeftModel.from_pretrained)
    mixtures  per_task/<task>/ (or per_cluster/<c>/): the routing averaged over the task's (cluster's)
              training examples is fixed, so each layer's delta is a static low-rank B' A' (see
              AdapterLinear.static_factors) written as a PEFT LoRA adapter; merged/<task>/ on request;
              fidelity.md: accuracy of each static export vs the dynamic adapter on that task
              adapter/  the dynamic adapter as is, with LOADING.md

Everything is written to a temporary folder, reloaded and checked, then renamed to run_dir/export, so a
failed export leaves nothing half-written and never replaces an existing export unless
``export.overwrite=true``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from rexft.adapters import adapter_layers, load_adapter, read_adapter_config, set_prior, set_token_mask
from rexft.config import RunConfig
from rexft.data import PromptFormat, build_splits, encode_prompt
from rexft.errors import RexftError
from rexft.modeling import load_model, load_tokenizer, torch_dtype

log = logging.getLogger(__name__)
LOADING = """# Loading this dynamic rexft adapter

Mixture adapters route per token, so they need rexft at inference:

```python
import rexft
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("<the base model>")
rexft.load_adapter(model, "{path}")          # checks the base-model fingerprint
rexft.set_prior(model, priors)               # trex with a prior: (batch, k) similarities to
                                             # prior_centroids.safetensors of embedded prompts
logits = model(**inputs).logits
```
"""


# -------------------------------------------------------------------------------------------- folding
def merge_into_base(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every LoRA layer by its base linear with W + B A (computed in float32)."""
    for name, layer in list(adapter_layers(model).items()):
        A, B = layer.static_factors(None)
        base = layer.base
        with torch.no_grad():
            base.weight.copy_((base.weight.float() + B.float() @ A.float()).to(base.weight.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, base)
    del model.rexft_adapter_config
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def write_peft_adapter(directory: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], base_name: str,
                       dtype: torch.dtype) -> Path:
    """A PEFT LoRA adapter with delta W = B A per layer (lora_alpha = r, so PEFT's scaling is 1)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    ranks = {name: A.shape[0] for name, (A, _) in factors.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {name: rank for name, rank in ranks.items() if rank != r}
    config = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(factors), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", base_model_name_or_path=base_name,
                        rank_pattern=pattern, alpha_pattern=dict(pattern))
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    tensors = {}
    for name, (A, B) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.to(dtype).contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.to(dtype).contiguous().cpu()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


@torch.inference_mode()
def mean_routes(model, tokenizer, fmt: PromptFormat, prompts: list[list[int]], priors: torch.Tensor | None,
                batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Per mixture layer: the route averaged over the real tokens of these prompts."""
    from rexft.evaluate import left_pad

    layers = {n: m for n, m in adapter_layers(model).items() if m.is_mixture}
    sums = {n: 0.0 for n in layers}
    weights = 0
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        batch = {k: v.to(device) for k, v in left_pad(chunk, pad_id).items()}
        set_prior(model, None if priors is None else priors[start:start + batch_size].to(device))
        set_token_mask(model, batch["attention_mask"])
        for layer in layers.values():
            layer.route_log = []
        model(**batch, use_cache=False, logits_to_keep=1)
        tokens = batch["attention_mask"].sum(1).float().cpu()  # (b,)
        for name, layer in layers.items():
            per_example = torch.cat(layer.route_log)  # (b, E)
            sums[name] = sums[name] + (per_example * tokens[:, None]).sum(0)
            layer.route_log = None
        weights += float(tokens.sum())
    return {name: total / weights for name, total in sums.items()}


def static_factors(model, routes: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: layer.static_factors(routes.get(name)) for name, layer in adapter_layers(model).items()}


# ---------------------------------------------------------------------------------------------- checks
def probe_ids(tokenizer, cfg: RunConfig) -> torch.Tensor:
    text = "Question: Which option is correct?\nA. yes\nB. no\nAnswer:"
    return torch.tensor([tokenizer(text).input_ids[: cfg.data.max_length]])


# ----------------------------------------------------------------------------------------------- stage
def export_dtype(cfg: RunConfig, model) -> torch.dtype:
    return next(model.parameters()).dtype if cfg.export.dtype == "auto" else torch_dtype(cfg.export.dtype)


def base_model_for_export(cfg: RunConfig, tokenizer):
    model_cfg = cfg.model
    if model_cfg.quantization:
        log.warning("model.quantization=%s: exporting onto the base dequantized to %s; merged weights are not the "
                    "4-bit weights the adapter was trained against", model_cfg.quantization, model_cfg.dtype)
        from dataclasses import replace

        model_cfg = replace(model_cfg, quantization=None)
    return load_model(model_cfg, len(tokenizer), "cpu")


def merge_export(cfg: RunConfig) -> Path:
    """``rexft merge-export``: returns run_dir/export."""
    out = cfg.path / "export"
    if out.exists() and any(out.iterdir()) and not cfg.export.overwrite:
        raise RexftError(f"{out} is not empty; pass export.overwrite=true to replace it")
    adapter_dir = cfg.path / "adapter"
    spec = read_adapter_config(adapter_dir)
    kind = spec["adapter"]["type"]
    mode = cfg.export.mode if cfg.export.mode != "auto" else ("merged" if kind == "lora" else "per_task")
    if mode == "merged" and kind != "lora":
        raise RexftError(f"export.mode=merged needs a lora adapter; a {kind} adapter routes per token, so export it "
                         "with export.mode=per_task, per_cluster or adapter")
    tmp = out.with_name(".export.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = load_tokenizer(cfg.model)
    manifest = {"adapter": str(adapter_dir), "type": kind, "mode": mode}
    if mode == "adapter":
        shutil.copytree(adapter_dir, tmp / "adapter")
        (tmp / "adapter" / "LOADING.md").write_text(LOADING.format(path="export/adapter"))
        reloaded = load_adapter(base_model_for_export(cfg, tokenizer), tmp / "adapter")
        manifest["reload_check"] = f"{len(adapter_layers(reloaded))} adapter layers loaded"
    elif mode == "merged":
        manifest.update(_export_lora(cfg, tokenizer, tmp))
    else:
        manifest.update(_export_static(cfg, tokenizer, tmp, spec, by=mode))
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(json.dumps(manifest, indent=2))
    return out


def _export_lora(cfg: RunConfig, tokenizer, tmp: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = load_adapter(base_model_for_export(cfg, tokenizer), cfg.path / "adapter").eval()
    dtype = export_dtype(cfg, model)
    ids = probe_ids(tokenizer, cfg)
    with torch.inference_mode():
        dynamic = model(input_ids=ids).logits.float()
    factors = static_factors(model, {})
    write_peft_adapter(tmp / "peft", factors, cfg.model.name_or_path, dtype)
    merged = merge_into_base(model).to(dtype)
    merged.save_pretrained(tmp / "merged", max_shard_size=cfg.export.max_shard_size)
    tokenizer.save_pretrained(tmp / "merged")
    # Reload checks: what was written, loaded by plain transformers / PEFT, gives the adapter's logits.
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp / "merged", dtype=torch.float32)
    with torch.inference_mode():
        gap_merged = float((reloaded(input_ids=ids).logits.float() - dynamic).abs().max())
        peft_model = PeftModel.from_pretrained(base_model_for_export(cfg, tokenizer), str(tmp / "peft")).eval()
        gap_peft = float((peft_model(input_ids=ids).logits.float() - dynamic).abs().max())
    scale = float(dynamic.abs().max())
    for what, gap in (("merged model", gap_merged), ("PEFT adapter", gap_peft)):
        if gap > tolerance * max(1.0, scale):
            raise RexftError(f"reload check failed: the exported {what} differs from the adapter by {gap:.3g} in logits")
    return {"merged": "merged", "peft": "peft", "dtype": str(dtype).replace("torch.", ""),
            "reload_check": {"merged_max_logit_gap": gap_merged, "peft_max_logit_gap": gap_peft}}


def _export_static(cfg: RunConfig, tokenizer, tmp: Path, spec: dict, by: str) -> dict:
    from peft import PeftModel

    from rexft.evaluate import Scorer, adapter_priors, summarize
    from rexft.prior import load_prior

    model = load_adapter(base_model_for_export(cfg, tokenizer), cfg.path / "adapter").eval()
    dtype = export_dtype(cfg, model)
    fmt = PromptFormat.for_model(tokenizer, cfg.model)
    splits = build_splits(cfg.data)
    train = [e for s in splits for e in s.train] or [e for s in splits for e in s.eval]
    priors = adapter_priors(cfg.path / "adapter", spec, [e.prompt for e in train], cfg)
    if by == "per_task":
        groups = {s.task: [i for i, e in enumerate(train) if e.task == s.task] for s in splits}
    else:
        if priors is None:
            centroids, meta = load_prior(cfg.path)
            from rexft.prior import priors_from

            priors_for_groups = priors_from([e.prompt for e in train], centroids, meta, cfg.prior)
        else:
            priors_for_groups = priors
        assign = priors_for_groups.argmax(1)
        groups = {f"cluster{c:02d}": (assign == c).nonzero().flatten().tolist() for c in range(priors_for_groups.shape[1])}
    groups = {name: index for name, index in groups.items() if index}
    folder = tmp / by
    written = {}
    for name, index in groups.items():
        index = index[:256]  # enough tokens for a stable mean route
        prompts = [encode_prompt(train[i], tokenizer, fmt, cfg.data.max_length)[0] for i in index]
        routes = mean_routes(model, tokenizer, fmt, prompts, None if priors is None else priors[index], cfg.eval.batch_size)
        write_peft_adapter(folder / name, static_factors(model, routes), cfg.model.name_or_path, dtype)
        written[name] = len(index)
        if cfg.export.merged_models:
            static = PeftModel.from_pretrained(base_model_for_export(cfg, tokenizer), str(folder / name)).merge_and_unload()
            static.to(dtype).save_pretrained(tmp / "merged" / name, max_shard_size=cfg.export.max_shard_size)
            tokenizer.save_pretrained(tmp / "merged" / name)
    result = {by: written, "dtype": str(dtype).replace("torch.", "")}
    if by == "per_task" and cfg.export.fidelity:
        rows = []
        for split in splits:
            if split.task not in written:
                continue
            examples = split.eval[: cfg.export.fidelity_limit]
            eval_priors = adapter_priors(cfg.path / "adapter", spec, [e.prompt for e in examples], cfg)
            dynamic = Scorer(model, tokenizer, fmt, cfg.data.max_length, cfg.eval.batch_size, eval_priors, progress=False)
            static_model = PeftModel.from_pretrained(base_model_for_export(cfg, tokenizer), str(folder / split.task)).eval()
            static = Scorer(static_model, tokenizer, fmt, cfg.data.max_length, cfg.eval.batch_size, None, progress=False)
            d = summarize(dynamic.first_token(examples), [split.task])["tasks"][split.task]
            s = summarize(static.first_token(examples), [split.task])["tasks"][split.task]
            rows.append((split.task, d, s))
        lines = ["| task | n | dynamic accuracy | static (per-task LoRA) accuracy | difference |", "|---|---|---|---|---|"]
        lines += [f"| {t} | {d['n']} | {d['accuracy']:.3f} | {s['accuracy']:.3f} | {s['accuracy'] - d['accuracy']:+.3f} |" for t, d, s in rows]
        (folder / "fidelity.md").write_text("Static per-task export vs the dynamic adapter (protocol first_token)\n\n" + "\n".join(lines) + "\n")
        print("\n".join(lines))
        result["fidelity"] = {t: {"dynamic": d["accuracy"], "static": s["accuracy"], "n": d["n"]} for t, d, s in rows}
    return result
