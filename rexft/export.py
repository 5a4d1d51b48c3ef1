"""Merge-export stage: turn a trained adapter into artifacts that standard tools load and serve.

    lora      merged/   W' = W + B A folded into the base weights, a plain Hugging Face model directory
              peft/     the adapter in PEFT format (PeftModel.from_pretrained)
    mixtures  per_task/<task>/ (or per_cluster/<c>/; a task name made a safe folder name, manifest.json's
              "folders" maps each task to its folder): the routing averaged over the task's (cluster's)
              training examples is fixed, so each layer's delta is a static low-rank B' A' (see
              AdapterLinear.static_factors) written as a PEFT LoRA adapter; merged/<task>/ on request;
              fidelity.md: each static export vs the dynamic adapter on its evaluation examples
              (accuracy for choice tasks, ROUGE-L for generative ones)
              adapter/  the dynamic adapter as is, with LOADING.md

Per-task export scales with the number of tasks: the base model is loaded once, every prompt is embedded
once, per-example routes come from one batched pass, and the fidelity check scores every static export at
once (GroupedLoRA: each row of a batch with its own group's B' A'), then reloads written adapters with PEFT
(two adapters of one PeftModel, each scored in its own pass) to check the files are those factors.

Everything is written to a temporary folder, reloaded and checked, then renamed to run_dir/export, so a
failed export leaves nothing half-written and never replaces an existing export unless
``export.overwrite=true``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import time
from pathlib import Path

import torch

from rexft.adapters import adapter_layers, load_adapter, read_adapter_config, set_prior
from rexft.adapters.base import TokenLayout
from rexft.config import RunConfig
from rexft.data import PromptFormat, encode_prompt
from rexft.errors import RexftError
from rexft.inference import adapter_priors, prefix_passes
from rexft.served_adapters import VLLM_MAX_RANK, cluster_name
from rexft.modeling import compute_dtype, load_model, load_tokenizer, model_fingerprint, pad_id, torch_dtype
from rexft.rundir import folder_name

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


def vllm_refusal(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> str | None:
    """Why vLLM's multi-LoRA server could not load an adapter with these factors (None: it can). vLLM loads
    LoRA on the linear layers of the decoder blocks, up to rank 512, with no bias, DoRA or modules_to_save
    (write_peft_adapter writes none of those three)."""
    rank = max(A.shape[0] for A, _ in factors.values())
    if rank > VLLM_MAX_RANK:
        return f"its rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_RANK})"
    outside = sorted(name for name in factors if not re.search(r"\.\d+\.", name))
    if outside:
        return (f"{len(outside)} target module(s) lie outside the decoder blocks ({', '.join(outside[:3])}), "
                "where vLLM loads no LoRA")
    return None


# Architectures whose LoRA adapters vLLM cannot load, as vLLM 0.32.0 reports them (its model registry and
# supports_lora); tests/test_architectures.py checks the table against the vLLM scripts/setup_vllm.sh installs.
VLLM_WITHOUT_LORA = {
    "FalconForCausalLM": "vLLM's Falcon model has no LoRA support",
    "PhimoeForCausalLM": "vLLM registers Phi-3.5-MoE as PhiMoEForCausalLM, not transformers' PhimoeForCausalLM",
}


def vllm_architecture_note(architecture: str | None) -> str | None:
    """Why vLLM could not load a LoRA adapter of this base architecture (None: it can, or it is not known not to)."""
    reason = VLLM_WITHOUT_LORA.get(architecture or "")
    return None if reason is None else f"vLLM cannot load LoRA adapters on {architecture} ({reason})"


def write_peft_adapter(directory: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], base_name: str,
                       dtype: torch.dtype) -> Path:
    """A PEFT LoRA adapter with delta W = B A per layer: one rank r for every layer (a thinner layer's
    factors padded with zero rows of A and columns of B, which add nothing), lora_alpha = r so the scaling is
    1 (it is folded into B A already), no bias: what PEFT and vLLM's multi-LoRA server load alike (vLLM
    ignores rank_pattern and alpha_pattern)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    r = max(A.shape[0] for A, _ in factors.values())
    config = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(factors), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", base_model_name_or_path=base_name)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    tensors = {}
    for name, (A, B) in factors.items():
        pad = r - A.shape[0]
        A, B = torch.nn.functional.pad(A, (0, 0, 0, pad)), torch.nn.functional.pad(B, (0, pad))
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.to(dtype).contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.to(dtype).contiguous().cpu()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


@torch.inference_mode()
def example_routes(model, tokenizer, prompts: list[list[int]], priors: torch.Tensor | None, batch_size: int = 16,
                   groups: list[str] | None = None, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per mixture layer: each prompt's route averaged over its tokens (n, E); and each prompt's token count (n,).
    Batches of length-sorted prompts, each in runs of similar length (``length_runs``). With ``groups`` (each
    prompt's task) and no priors, the opening a task's prompts share is run once per batch and its tokens'
    routes counted for every prompt. ``dtype``: compute in it under autocast (e.g. bfloat16 for a float32
    model: the routes are a mean over many tokens, so bf16's rounding is far below their sampling noise)."""
    weight = next(model.parameters())
    autocast = dtype is not None and dtype != weight.dtype
    with torch.autocast(weight.device.type, dtype=dtype) if autocast else contextlib.nullcontext():
        return _routes(model, tokenizer, prompts, priors, batch_size, groups)


def _routes(model, tokenizer, prompts, priors, batch_size, groups) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    layers = {n: m for n, m in adapter_layers(model).items() if m.is_mixture}
    routes = {n: [None] * len(prompts) for n in layers}
    device = next(model.parameters()).device
    set_prior(model, None)
    set_rows = None if priors is None else (lambda rows: set_prior(model, priors[rows].to(device)))
    for layer in layers.values():
        layer.route_log = []
    opening = {}
    for step in prefix_passes(model, prompts, pad_id(tokenizer), batch_size, groups, set_rows):
        if step.run is None:  # a batch's openings, run once (only without priors): their routes count for every row
            opening = {name: layer.route_log.pop()[step.opening_rows] for name, layer in layers.items()}  # (b, E)
            continue
        rows = [step.batch[r] for r in step.run]
        opened = any(step.lengths)
        weight = torch.tensor([[step.lengths[r] / len(prompts[i])] for r, i in zip(step.run, rows)])  # the opening's share
        for name, layer in layers.items():
            per_row = layer.route_log.pop()  # (len(run), E) over each row's tokens after its opening
            if opened:
                per_row = weight * opening[name][step.run] + (1 - weight) * per_row
            for i, route in zip(rows, per_row):
                routes[name][i] = route
    for layer in layers.values():
        layer.route_log = None
    tokens = torch.tensor([float(len(p)) for p in prompts])
    return {n: torch.stack(r) for n, r in routes.items() if prompts}, tokens


def mean_routes(routes: dict[str, torch.Tensor], tokens: torch.Tensor, index: list[int]) -> dict[str, torch.Tensor]:
    """The route of a group of prompts: their per-prompt routes weighted by their token counts."""
    weights = tokens[index]
    return {name: (per_prompt[index] * weights[:, None]).sum(0) / weights.sum() for name, per_prompt in routes.items()}


class GroupedLoRA(torch.nn.Module):
    """Every static export of one layer at once, for inference: out = base(x) + B_g (A_g x), with g the
    group (task or cluster) of each row, set per batch by :func:`set_groups`. For one group this is what
    PEFT computes from that group's exported adapter; a batch mixing groups is PEFT's mixed-adapter batch.
    Each group present runs its two thin matmuls on its own rows (a batch keeps a task's rows together, so
    most batches hold one group), added in place into the base output."""

    def __init__(self, base: torch.nn.Module, A: torch.Tensor, B: torch.Tensor, layout: TokenLayout | None = None,
                 name: str = "GroupedLoRA"):
        super().__init__()
        self.base = base
        self.A, self.B = A, B  # (G, r, in), (G, out, r)
        self.layout, self.name = layout or TokenLayout(), name  # the model's token grid (b, s): rows of x
        self.groups: torch.Tensor | None = None  # (b,) group index of each row
        self.members: list[tuple[int, torch.Tensor | None]] = []  # (group, its rows; None: every row)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        if not out.is_contiguous():
            out = out.contiguous()
        members = self.members
        if len(members) > 1:  # rows of different groups: x seen in the batch's (b, s) grid, whatever its layout
            x = self.layout.view(x, self.name, "its rows belong to different exports")  # (b, s, in)
            if self.groups.shape[0] != x.shape[0]:  # generate() with beams repeats rows
                members = group_members(self.groups.repeat_interleave(x.shape[0] // self.groups.shape[0]))
        whole, out = out, out.view(*x.shape[:-1], out.shape[-1])  # (b, s, out) when x was flattened
        for group, rows in members:
            part = x if rows is None else x.index_select(0, rows)
            z = torch.nn.functional.linear(part.to(self.A.dtype), self.A[group])  # (n, s, r)
            delta = torch.nn.functional.linear(z, self.B[group]).to(out.dtype)  # (n, s, out)
            if rows is None:
                out.add_(delta)
            else:
                out.index_add_(0, rows, delta)
        return whole


def group_members(groups: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """(group, the rows in it) for each group present in ``groups`` (b,); the rows are None when all are."""
    present = groups.unique().tolist()
    if len(present) == 1:
        return [(present[0], None)]
    return [(g, (groups == g).nonzero().squeeze(1)) for g in present]


def stack_static_factors(model: torch.nn.Module, per_group: list[dict]) -> list[GroupedLoRA]:
    """Swap every adapter layer of ``model`` for a GroupedLoRA holding each group's static factors."""
    grouped = []
    for name, layer in list(adapter_layers(model).items()):
        A = torch.stack([factors[name][0] for factors in per_group]).float()
        B = torch.stack([factors[name][1] for factors in per_group]).float()
        module = GroupedLoRA(layer.base, A, B, layer.layout, name)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module)
        grouped.append(module)
    del model.rexft_adapter_config
    return grouped


def set_groups(layers: list[GroupedLoRA], groups: torch.Tensor) -> None:
    members = group_members(groups)
    for layer in layers:
        layer.groups, layer.members = groups, members


def check_written(cfg: RunConfig, tokenizer, folder: Path, names: list[str], layers: list[GroupedLoRA], model,
                  dtype: torch.dtype) -> None:
    """The adapters on disk are the factors scored: the first and last written, loaded by PEFT onto a
    fresh base as two adapters of one model, each give GroupedLoRA's logits for their group on a probe
    prompt, to the export dtype's precision. Each adapter gets its own pass (``set_adapter``), not PEFT's
    mixed batch: ``adapter_names`` counts rows, and MoE blocks (Qwen2-MoE's experts) see flattened tokens."""
    from peft import PeftModel

    chosen = sorted({0, len(names) - 1})
    ids = probe_ids(tokenizer, cfg).expand(len(chosen), -1)
    set_groups(layers, torch.tensor(chosen))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits.float()
        base = base_model_for_export(cfg, tokenizer).eval()
        def path(index: int) -> str:
            return str(folder / folder_name(names[index]))

        # PEFT's adapter names are module keys: g<index>, not the task's name
        loaded = PeftModel.from_pretrained(base, path(chosen[0]), adapter_name=f"g{chosen[0]}").eval()
        for index in chosen[1:]:
            loaded.load_adapter(path(index), adapter_name=f"g{index}")
        got = []
        for row, index in enumerate(chosen):
            loaded.set_adapter(f"g{index}")
            got.append(loaded(input_ids=ids[row:row + 1]).logits.float()[0])
    for row, index in enumerate(chosen):
        gap = float((got[row] - expected[row]).abs().max())
        if gap > (1e-3 if dtype == torch.float32 else 5e-2) * max(1.0, float(expected[row].abs().max())):
            raise RexftError(f"reload check failed: export {folder / folder_name(names[index])} differs from its factors by {gap:.3g} in logits")


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
    note = vllm_architecture_note(model_fingerprint(merged)["architecture"])
    if note:
        log.warning("peft/: written for PEFT; %s (merged/ needs no LoRA support)", note)
    return {"merged": "merged", "peft": "peft", "dtype": str(dtype).replace("torch.", ""), **({"vllm": note} if note else {}),
            "reload_check": {"merged_max_logit_gap": gap_merged, "peft_max_logit_gap": gap_peft}}


def _export_static(cfg: RunConfig, tokenizer, tmp: Path, spec: dict, by: str) -> dict:
    from peft import PeftModel
    from tqdm.auto import tqdm

    from rexft.splits import cap_examples
    from rexft.prior import load_prior, priors_from
    from rexft.splits import frozen_splits

    adapter_dir = cfg.path / "adapter"
    model = load_adapter(base_model_for_export(cfg, tokenizer), adapter_dir).eval()
    dtype = export_dtype(cfg, model)
    fmt = PromptFormat.for_model(tokenizer, cfg.model)
    splits = frozen_splits(cfg)  # the held-in tasks as `rexft data` recorded them
    train = [e for s in splits for e in s.train] or [e for s in splits for e in s.eval]
    checked = [e for s in splits for e in cap_examples(s.eval, cfg.export.fidelity_limit, cfg.data.seed + 2, s.task)]
    if not cfg.export.fidelity:
        checked = []
    texts = [e.prompt for e in train + checked]
    if by == "per_task":
        keys = [e.task for e in train + checked]
        priors = None
    else:  # every prompt's cluster: one embedding pass for all
        priors = adapter_priors(adapter_dir, spec, texts, cfg)
        if priors is not None:
            similarity = priors
        else:  # an adapter without a prior: clusters of the run's prior/
            centroids, meta = load_prior(cfg.path)
            similarity = priors_from(texts, centroids, meta, cfg.prior)
        keys = [cluster_name(c) for c in similarity.argmax(1)]
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys[: len(train)]):
        groups.setdefault(key, []).append(i)
    route_index = {name: index[: cfg.export.route_examples] for name, index in groups.items()}
    used = sorted({i for index in route_index.values() for i in index})
    if by == "per_task":  # priors only for the prompts routed and checked (not every training prompt)
        needed = used + list(range(len(train), len(texts)))
        some = adapter_priors(adapter_dir, spec, [texts[i] for i in needed], cfg)
        if some is not None:
            priors = some.new_zeros(len(texts), some.shape[1])
            priors[needed] = some
    prompts = {i: encode_prompt(train[i], tokenizer, fmt, cfg.data.max_length)[0] for i in used}
    route_index = {name: [i for i in index if prompts[i] is not None] for name, index in route_index.items()}
    kept = [i for i in used if prompts[i] is not None]
    position = {i: p for p, i in enumerate(kept)}
    clock = time.perf_counter()
    route_dtype = compute_dtype(cfg.export.route_dtype, model)
    routes, tokens = example_routes(model, tokenizer, [prompts[i] for i in kept], None if priors is None else priors[kept],
                                    cfg.eval.batch_size, groups=[train[i].task for i in kept], dtype=route_dtype)
    log.info("routes of %d training prompts in %.1fs%s", len(kept), time.perf_counter() - clock,
             "" if route_dtype is None else f" (computed in {str(route_dtype).replace('torch.', '')})")
    folder = tmp / by
    written, factors = {}, {}
    for name, index in tqdm(sorted(route_index.items()), desc=f"export {by}", leave=False):
        if not index:
            continue
        group_routes = mean_routes(routes, tokens, [position[i] for i in index])
        factors[name] = static_factors(model, group_routes)
        refusal = cfg.export.vllm_compatible and vllm_refusal(factors[name])
        if refusal:
            raise RexftError(f"export {by}/{folder_name(name)}: vLLM could not load this adapter: {refusal}; "
                             "pass export.vllm_compatible=false to write it for PEFT only")
        write_peft_adapter(folder / folder_name(name), factors[name], cfg.model.name_or_path, dtype)
        written[name] = len(index)
    note = cfg.export.vllm_compatible and vllm_architecture_note(model_fingerprint(model)["architecture"])
    if note:  # the adapters are what PEFT loads all the same: written, and said so
        log.warning("%s/: written for PEFT; %s", by, note)
    result = {by: written, "folders": {name: folder_name(name) for name in written},  # task -> its folder under by/
              "rank": max((A.shape[0] for f in factors.values() for A, _ in f.values()), default=0),
              "vllm_compatible": cfg.export.vllm_compatible and not note, **({"vllm": note} if note else {}),
              "dtype": str(dtype).replace("torch.", ""), "route_examples": cfg.export.route_examples,
              "route_dtype": str(route_dtype or next(model.parameters()).dtype).replace("torch.", "")}
    if checked:
        result["fidelity"], result["fidelity_dynamic_from_eval"] = _fidelity(cfg, model, tokenizer, fmt, folder, written, factors, dtype, checked,
                                       keys[len(train):], None if priors is None else priors[len(train):], by)
    for name in written if cfg.export.merged_models else []:  # opt-in: a full model per group
        merged = PeftModel.from_pretrained(base_model_for_export(cfg, tokenizer), str(folder / folder_name(name))).merge_and_unload()
        merged.to(dtype).save_pretrained(tmp / "merged" / folder_name(name), max_shard_size=cfg.export.max_shard_size)
        tokenizer.save_pretrained(tmp / "merged" / folder_name(name))
    return result


def _fidelity(cfg: RunConfig, model, tokenizer, fmt: PromptFormat, folder: Path, written: dict[str, int],
              factors: dict[str, dict], dtype: torch.dtype, examples: list, keys: list[str], priors,
              by: str) -> tuple[dict, int]:
    """Each static export vs the dynamic adapter on its evaluation examples (those of its task, or those
    whose prior puts them in its cluster): accuracy for choice examples, ROUGE-L for generative ones.
    Returns the table's rows and how many dynamic scores came from rexft eval's predictions."""
    from dataclasses import replace

    from rexft.eval import Prompts, headline, reusable_predictions, score_examples, summarize
    from rexft.inference import RowState, make_engine, prior_state

    index = [i for i, key in enumerate(keys) if key in written]
    examples, keys = [examples[i] for i in index], [keys[i] for i in index]
    priors = None if priors is None else priors[index]
    clock = time.perf_counter()
    # The dynamic side: rexft eval's predictions where it scored these examples with this adapter and these
    # settings (the fidelity examples are the first of eval's own per-task sample), the rest scored here.
    prompts = Prompts(tokenizer, fmt, cfg.data.max_length)
    known = reusable_predictions(cfg)
    dynamic = [known.get((e.task, e.row)) for e in examples]
    todo = [i for i, row in enumerate(dynamic) if row is None]
    if todo:
        engine = make_engine(cfg.eval.engine, model, tokenizer, prior_state(model, None if priors is None else priors[todo]),
                             cfg.eval.batch_size, cfg.eval.profile)
        for i, row in zip(todo, score_examples(engine, prompts, [examples[i] for i in todo], cfg.eval)):
            dynamic[i] = row
    log.info("fidelity: the dynamic adapter on %d examples in %.1fs (%d from rexft eval's predictions)",
             len(examples), time.perf_counter() - clock, len(examples) - len(todo))
    clock = time.perf_counter()
    # Every static export at once (GroupedLoRA): each example scored with its own group's B' A'.
    names = list(written)
    group_of = torch.tensor([names.index(key) for key in keys])
    layers = stack_static_factors(model, [factors[name] for name in names])
    # Each row's group: the same for a task's rows per task (they may share their opening), per row per cluster.
    rows = RowState(lambda ids: set_groups(layers, group_of[ids]), "group" if by == "per_task" else "row")
    engine = make_engine(cfg.eval.engine, model, tokenizer, rows, cfg.eval.batch_size, cfg.eval.profile)
    static = score_examples(engine, prompts, examples, cfg.eval)
    log.info("fidelity: %d static exports on the same examples in %.1fs", len(written), time.perf_counter() - clock)
    check_written(cfg, tokenizer, folder, names, layers, model, dtype)
    rows, table = {}, []
    for name in written:
        members = [i for i, key in enumerate(keys) if key == name]
        for kind in ("choice", "generate"):
            chosen = [i for i in members if examples[i].kind == kind]
            if not chosen:
                continue
            # summarised per group (a cluster mixes tasks)
            d = summarize([replace(dynamic[i], task=name) for i in chosen], [name], resamples=0)["tasks"][name]
            s = summarize([replace(static[i], task=name) for i in chosen], [name], resamples=0)["tasks"][name]
            if not d["n"]:
                continue
            metric, dynamic_value = headline(d)
            static_value = headline(s)[1]
            rows[f"{name}:{kind}" if len(members) != len(chosen) else name] = {
                "metric": metric, "n": d["n"], "dynamic": dynamic_value, "static": static_value}
            table.append(f"| {name} | {d['n']} | {metric} | {dynamic_value:.3f} | {static_value:.3f} | "
                         f"{static_value - dynamic_value:+.3f} |")
    header = [f"| {by.replace('per_', '')} | n | metric | dynamic adapter | static export | difference |",
              "|---|---|---|---|---|---|"]
    gaps = [abs(r["static"] - r["dynamic"]) for r in rows.values()]
    summary = (f"Static {by} exports vs the dynamic adapter, {len(rows)} rows; mean |difference| "
               f"{sum(gaps) / max(1, len(gaps)):.3f}, largest {max(gaps, default=0):.3f}")
    (folder / "fidelity.md").write_text(summary + "\n\n" + "\n".join(header + table) + "\n")
    print(summary if len(table) > 30 else "\n".join([summary, ""] + header + table))
    return rows, len(examples) - len(todo)
