"""A run's model for inference: base model + trained adapter (or a merged export), and the run's priors.

Every stage that runs the trained model (eval, merge-export's fidelity check, serve, the lm-eval harness)
loads it here, so they agree on what "the run's model" is and on how a prompt's prior is computed: the
embedding's similarities to the centroids saved with the adapter, as at training.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from rexft.adapters import ADAPTER_CONFIG, load_adapter, read_adapter_config
from rexft.config import RunConfig
from rexft.errors import RexftError
from rexft.modeling import default_device, load_model, load_tokenizer


class LoadedModel(NamedTuple):
    model: object
    tokenizer: object
    adapter_config: dict | None  # the adapter's saved config (None: a base model or a merged export)
    description: str  # for reports: "adapter <dir>", "base model <name>", "merged model <dir>"


def load_model_for_inference(cfg: RunConfig) -> LoadedModel:
    """``eval.model`` (a merged export), else the base model with run_dir/adapter unless
    ``eval.use_adapter=false``; on the default device, in eval mode."""
    device = default_device()
    if cfg.eval.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(cfg.eval.model)
        if not (path / "config.json").is_file():
            raise RexftError(f"eval.model={path} is not a model directory (no config.json)")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).to(device)
        return LoadedModel(model.eval(), tokenizer, None, f"merged model {path}")
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, len(tokenizer), device)
    adapter_dir = cfg.path / "adapter"
    if not cfg.eval.use_adapter:
        return LoadedModel(model.eval(), tokenizer, None, f"base model {cfg.model.name_or_path}")
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise RexftError(f"no adapter at {adapter_dir}: run `rexft train` with this recipe first, "
                         "or pass eval.use_adapter=false to evaluate the base model")
    load_adapter(model, adapter_dir)
    return LoadedModel(model.to(device).eval(), tokenizer, read_adapter_config(adapter_dir), f"adapter {adapter_dir}")


def adapter_priors(adapter_dir: Path, adapter_config: dict, prompts: list[str], cfg: RunConfig) -> torch.Tensor | None:
    """Priors (n, k) for ``prompts`` from the centroids saved with the adapter (None if it takes none)."""
    from rexft.prior import adapter_prior, priors_from

    prior = adapter_prior(adapter_dir, adapter_config)
    return None if prior is None else priors_from(prompts, *prior, cfg.prior)
