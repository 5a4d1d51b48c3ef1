"""What every adapter shares: it wraps a frozen linear layer and adds a low-rank, possibly routed, delta.

    y = base(x) + delta(dropout(x))

``base`` is the model's own module (nn.Linear, a bitsandbytes 4-bit linear, or a ZeRO-3 partitioned
one), kept as is and never copied; shapes come from ``in_features``/``out_features``, never from the
weight, which is empty under ZeRO-3. Adapter parameters are named ``rex_*`` so that "trainable ==
adapter parameters" is ``is_adapter_param(name)``.

Per-batch inputs (the semantic prior, the attention mask for routing statistics) are set on the
modules with :func:`rexft.adapters.set_prior` before the forward. They stay there until the next batch,
so the forward recomputed under activation checkpointing sees the same values.

Mixture adapters expose one routing tensor per token, ``route`` of shape (b, s, E_route), and
``static_factors(mean_route)`` giving LoRA factors (A, B) with delta(x) = B A x when the route is the
constant ``mean_route``: that is how dynamic adapters are exported to static PEFT LoRA adapters.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from rexft.config import AdapterConfig

PREFIX = "rex_"


def is_adapter_param(name: str) -> bool:
    return any(part.startswith(PREFIX) for part in name.split("."))


def lora_scaling(cfg: AdapterConfig, rank: int) -> float:
    return cfg.alpha / math.sqrt(rank) if cfg.rslora else cfg.alpha / rank


def kaiming_(weight: torch.Tensor) -> torch.Tensor:
    """LoRA's A init (nn.Linear's default): uniform with bound 1/sqrt(in_features)."""
    return nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def sparse_softmax(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Softmax over the last dim; with top_k, the rest are masked to -inf first (renormalised top-k)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.softmax(-1)


class AdapterLinear(nn.Module):
    """Base class: subclasses define their ``rex_*`` parameters and ``delta(x)``."""

    is_mixture = False

    def __init__(self, base: nn.Module, cfg: AdapterConfig):
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.aux_loss_weight = cfg.aux_loss_weight
        self.dtype = getattr(torch, cfg.dtype)
        # Per-batch state (not parameters or buffers: never saved, set by set_prior/set_token_mask).
        self.prior: torch.Tensor | None = None  # (b, k) or (b, s, k)
        self.token_mask: torch.Tensor | None = None  # (b, s), 1 on real tokens
        self.last_route_mean: torch.Tensor | None = None  # (E,) mean route over real tokens
        self.aux_loss: torch.Tensor | None = None
        self.route_log: list[torch.Tensor] | None = None  # when a list: per-example mean routes are appended

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        delta = self.delta(self.dropout(x).to(self.dtype))
        return out + delta.to(out.dtype)

    # ---- routing bookkeeping shared by mixtures
    def batch_prior(self, x: torch.Tensor) -> torch.Tensor | None:
        """The prior broadcastable to x's tokens: (b, 1, k) or (b, s, k)."""
        prior = self.prior
        if prior is None:
            return None
        if prior.shape[0] != x.shape[0]:  # generate() with beams / num_return_sequences repeats rows
            prior = prior.repeat_interleave(x.shape[0] // prior.shape[0], dim=0)
        prior = prior.to(device=x.device, dtype=x.dtype)
        return prior.unsqueeze(1) if prior.dim() == 2 else prior

    def observe(self, route: torch.Tensor, probs: torch.Tensor | None) -> None:
        """Record routing statistics (detached) and the load-balancing loss of this forward."""
        with torch.no_grad():
            mask = self.token_mask
            if mask is not None and mask.shape == route.shape[:2]:
                weights = mask.to(route.dtype).unsqueeze(-1)  # (b, s, 1)
            else:
                weights = torch.ones_like(route[..., :1])
            per_example = (route * weights).sum(1) / weights.sum(1).clamp_min(1)  # (b, E)
            self.last_route_mean = per_example.mean(0)
            if self.route_log is not None:
                self.route_log.append(per_example.float().cpu())
        if self.aux_loss_weight > 0 and probs is not None:
            usage = probs.reshape(-1, probs.shape[-1]).mean(0)  # (E,) mean router probability
            self.aux_loss = self.aux_loss_weight * probs.shape[-1] * (usage * usage).sum()  # 1 at uniform

    def static_factors(self, mean_route: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with delta(x) = B @ A @ x when the route is constant ``mean_route``."""
        raise NotImplementedError


def fused_down(x: torch.Tensor, down: torch.Tensor, router: nn.Linear | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One matmul for the down-projection and the router: returns (h, router logits)."""
    if router is None:
        return F.linear(x, down), None
    weight = torch.cat([down, router.weight])  # (r + E, in)
    bias = torch.cat([down.new_zeros(down.shape[0]), router.bias])
    h, logits = F.linear(x, weight, bias).split([down.shape[0], router.out_features], dim=-1)
    return h, logits
