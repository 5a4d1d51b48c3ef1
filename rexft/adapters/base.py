"""What every adapter shares: it wraps a frozen linear layer and adds a low-rank, possibly routed, delta.

    y = base(x) + B z(dropout(x))          B = rex_B: (out, R),  z(x): (R,) per token

Every adapter here is an up-projection B applied to R coefficients z(x) that the subclass computes
(``coefficients``): LoRA's z is s A x; the mixtures' z holds each rank-one expert's routed coefficient.
Scalars (LoRA scaling, T-REX's gate) are applied to z, never to the (out,)-sized delta, and the
residual add is fused into the up-projection GEMM (``addmm``), so beyond its dropout the adapter costs
two thin matmuls and no full-width element-wise pass in either direction. B enters the GEMM as a
contiguous (R, out) copy: with R as small as 8, the transposed view makes both of B's backward GEMMs
several times slower on CPU BLAS (copying (R, out) costs nothing beside them).

Dropout (``LaneDropout``): on CPU, torch's dropout draws one random double per element and multiplies by
a bool mask through a slow promotion path, ~4x the whole cost of the mask's arithmetic; here one 64-bit
draw gives four 16-bit lanes, each kept when it is at least p's threshold (p rounded to 1/65536), and the
0/1 mask multiplies as uint8. Same distribution (independent Bernoulli(1 - p) per element, scaled by
1/(1 - p)), same seeding (torch's generator); other devices use torch's fused dropout.

``base`` is the model's own module (nn.Linear, a bitsandbytes 4-bit linear, or a ZeRO-3 partitioned
one), kept as is and never copied; shapes come from ``in_features``/``out_features``, never from the
weight, which is empty under ZeRO-3. Adapter parameters are named ``rex_*`` so that "trainable ==
adapter parameters" is ``is_adapter_param(name)``.

Per-batch inputs (the semantic prior, the attention mask for routing statistics) are set on the
modules with :func:`rexft.adapters.set_prior` before the forward. They stay there until the next batch,
so the forward recomputed under activation checkpointing sees the same values.

Token layout. Per-example state follows the tokens, whatever shape a block gives the linear layer. The
model's forward records the batch's token grid (b, s) (:class:`TokenLayout`, a pre-hook set once at
injection); a mixture views its input as (b, s, in) before routing:

    x: (b, s, in)      as is                       (most blocks; packed rows are (1, L, in))
    x: (b*s, in)       x.unflatten(0, (b, s))     (blocks that flatten the batch, e.g. Qwen2-MoE's shared
                                                   expert); the output is viewed back to (b*s, out)
    anything else      RexftError naming the module (a permuted grid, experts that see only their routed
                       tokens): those tokens cannot be mapped back to their examples

so the prior (b, k) or (b, s, k), the token mask (b, s) and the per-example routes line up with the tokens
exactly as in the (b, s, in) case. The flattened case assumes the block flattened (b, s) row-major, as
``view(-1, hidden)`` does. LoRA has no per-example state and takes any layout.

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
from rexft.errors import RexftError

PREFIX = "rex_"


def is_adapter_param(name: str) -> bool:
    return any(part.startswith(PREFIX) for part in name.split("."))


def lora_scaling(cfg: AdapterConfig, rank: int) -> float:
    return cfg.alpha / math.sqrt(rank) if cfg.rslora else cfg.alpha / rank


def kaiming_(weight: torch.Tensor) -> torch.Tensor:
    """LoRA's A init (nn.Linear's default): uniform with bound 1/sqrt(in_features)."""
    return nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class LaneDropout(nn.Module):
    """Dropout, with the CPU mask drawn four 16-bit lanes per 64-bit random number (see the module doc)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return _LaneDropout.apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _LaneDropout(torch.autograd.Function):
    """y = x * keep / (1 - p) with keep a uint8 0/1 mask (saved for the backward: 1 byte per element, as
    torch's bool mask); one int64 draw covers four elements (torch's generator, full 64-bit range)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        lanes = torch.empty(-(-x.numel() // 4), dtype=torch.int64).random_(-2**63, None).view(torch.int16)
        keep = (lanes[: x.numel()] >= round(p * 2**16) - 2**15).view(x.shape).view(torch.uint8)  # P(keep) = 1 - p
        ctx.save_for_backward(keep)
        ctx.scale = 1 / (1 - p)
        return torch.mul(x, keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep).mul_(ctx.scale), None


class TokenLayout:
    """The token grid (b, s) of the model's current forward, shared by every adapter of a model.

    ``record`` is a forward pre-hook on the model (registered by ``inject_adapters``): it reads the (b, s)
    of ``input_ids`` (or ``inputs_embeds``) of every call, generate()'s decoding steps included. It stays
    set until the next forward, so a forward recomputed under activation checkpointing sees the same grid.
    ``shape`` is None for a layer used on its own (outside a model's forward).
    """

    def __init__(self):
        self.shape: tuple[int, int] | None = None

    def record(self, module, args, kwargs) -> None:
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None and args and torch.is_tensor(args[0]):
            tokens = args[0]
        self.shape = tuple(tokens.shape[:2]) if torch.is_tensor(tokens) and tokens.dim() >= 2 else None

    def view(self, x: torch.Tensor, name: str, why: str) -> torch.Tensor:
        """x: (..., d) seen as (b, s, d) in the batch's token grid, or one error naming the module."""
        if self.shape is None:  # a layer on its own: its input's leading dims are the grid
            return x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])
        b, s = self.shape
        if x.shape[:-1] == (b, s):
            return x
        if x.dim() == 2 and x.shape[0] == b * s:  # the block flattened (b, s, d) to (b*s, d)
            return x.unflatten(0, (b, s))
        raise RexftError(
            f"{name}: its input has shape {tuple(x.shape)} but the batch holds {b} x {s} tokens; {why}, and these "
            "tokens cannot be mapped back to their examples (a permuted layout, or a subset of the tokens such as "
            f"a mixture-of-experts' routed tokens). Exclude it (adapter.exclude_modules=['{name.rsplit('.', 1)[-1]}$']) "
            "or use adapter=lora")


def sparse_softmax(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Softmax over the last dim; with top_k, the rest are masked to -inf first (renormalised top-k)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.softmax(-1)


class AdapterLinear(nn.Module):
    """Base class: subclasses define their ``rex_*`` parameters (``rex_B`` among them) and ``coefficients(x)``."""

    is_mixture = False

    def __init__(self, base: nn.Module, cfg: AdapterConfig):
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.dropout = LaneDropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.aux_loss_weight = cfg.aux_loss_weight
        self.dtype = getattr(torch, cfg.dtype)
        # Per-batch state (not parameters or buffers: never saved, set by set_prior/set_token_mask).
        self.prior: torch.Tensor | None = None  # (b, k) or (b, s, k)
        self.token_mask: torch.Tensor | None = None  # (b, s), 1 on real tokens
        self.token_examples: tuple[torch.Tensor, int] | None = None  # packed rows: (b, s) example of each token, count
        self.layout = TokenLayout()  # the model's own, shared by its adapters, once injected
        self.name = type(self).__name__  # the module's name in the model, once injected (for errors)
        self.last_route: tuple | None = None  # (route, token mask, token examples), detached
        self.aux_loss: torch.Tensor | None = None
        self.route_log: list[torch.Tensor] | None = None  # when a list: per-example mean routes are appended

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """z(x): (..., R), the coefficients of B's R columns."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.is_mixture:  # per-token math and no per-example state: any layout
            return self._forward(x, *args, **kwargs)
        tokens = self.layout.view(x, self.name, f"a {type(self).__name__} routes per example")  # (b, s, in)
        out = self._forward(tokens, *args, **kwargs)  # (b, s, out)
        return out if tokens is x else out.reshape(*x.shape[:-1], out.shape[-1])

    def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        z = self.coefficients(self.dropout(x).to(self.dtype))  # (..., R)
        flat_z, up = z.reshape(-1, z.shape[-1]), self.rex_B.t().contiguous()
        if self._adds_in_place(x, z, args, kwargs):
            # nn.Linear's backward never reads its output, so B z is accumulated into it by the GEMM. The
            # base runs on the 2-D view of x: an in-place op on a reshaped *output* would make autograd
            # copy the full-width gradient (CopySlices) in the backward.
            out = self.base(x.reshape(-1, self.in_features))
            return out.addmm_(flat_z, up).view(*x.shape[:-1], self.out_features)
        out = self.base(x, *args, **kwargs)
        if torch.is_autocast_enabled(out.device.type) or z.dtype == out.dtype == up.dtype:
            return torch.addmm(out.reshape(-1, self.out_features), flat_z, up).view(*out.shape[:-1], self.out_features)
        return out + F.linear(z, self.rex_B).to(out.dtype)  # e.g. a bf16 4-bit base under float32 adapters

    def _adds_in_place(self, x, z, args, kwargs) -> bool:
        return (type(self.base) is nn.Linear and not args and not kwargs and not torch.is_autocast_enabled(x.device.type)
                and x.dtype == self.base.weight.dtype == z.dtype == self.rex_B.dtype)

    # ---- routing bookkeeping shared by mixtures
    def batch_prior(self, x: torch.Tensor) -> torch.Tensor | None:
        """The prior broadcastable to x's tokens (b, s, in): (b, 1, k) or (b, s, k)."""
        prior = self.prior
        if prior is None:
            return None
        if prior.shape[0] != x.shape[0]:  # generate() with beams / num_return_sequences repeats rows
            if x.shape[0] % prior.shape[0]:
                raise RexftError(f"{self.name}: a prior for {prior.shape[0]} examples does not fit a batch of {x.shape[0]} rows")
            prior = prior.repeat_interleave(x.shape[0] // prior.shape[0], dim=0)
        if prior.dim() == 3 and prior.shape[1] != x.shape[1]:
            raise RexftError(f"{self.name}: a per-token prior of {prior.shape[1]} tokens a row does not fit rows of {x.shape[1]} tokens")
        prior = prior.to(device=x.device, dtype=x.dtype)
        return prior.unsqueeze(1) if prior.dim() == 2 else prior

    def observe(self, route: torch.Tensor, probs: torch.Tensor | None) -> None:
        """Keep this forward's routes for statistics (summarised only when asked: the training step
        pays nothing for them) and compute the load-balancing loss."""
        self.last_route = (route.detach(), self.token_mask, self.token_examples)
        if self.route_log is not None:
            self.route_log.append(self.per_example_route().float().cpu())
        if self.aux_loss_weight > 0 and probs is not None:
            usage = probs.reshape(-1, probs.shape[-1]).mean(0)  # (E,) mean router probability
            self.aux_loss = self.aux_loss_weight * probs.shape[-1] * (usage * usage).sum()  # 1 at uniform

    @torch.no_grad()
    def per_example_route(self) -> torch.Tensor:
        """(n, E): each example's mean route over its real tokens, from the last forward: n = b rows, or, for
        packed rows (``set_token_mask`` with examples), the n examples they hold."""
        route, mask, examples = self.last_route  # (b, s, E), (b, s) or None, ((b, s), n) or None
        if examples is not None and examples[0].shape == route.shape[:2]:
            index, count = examples
            weights = (index >= 0).to(route.dtype)  # -1: padding
            if mask is not None and mask.shape == index.shape:
                weights = weights * mask.to(route.dtype)
            index, weights, flat = index.reshape(-1).clamp_min(0), weights.reshape(-1, 1), route.reshape(-1, route.shape[-1])
            sums = flat.new_zeros(count, flat.shape[-1]).index_add_(0, index, flat * weights)  # (n, E)
            return sums / flat.new_zeros(count, 1).index_add_(0, index, weights).clamp_min(1e-12)
        if mask is not None and mask.shape == route.shape[:2]:
            weights = mask.to(route.dtype).unsqueeze(-1)  # (b, s, 1)
            return (route * weights).sum(1) / weights.sum(1).clamp_min(1)
        return route.mean(1)

    @property
    def last_route_mean(self) -> torch.Tensor | None:
        """(E,): the mean route of the last forward, averaged over examples."""
        return None if self.last_route is None else self.per_example_route().mean(0)

    def static_factors(self, mean_route: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with delta(x) = B @ A @ x when the route is constant ``mean_route``."""
        raise NotImplementedError


def fused_down(x: torch.Tensor, down: torch.Tensor, router: nn.Linear | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One matmul for the down-projection and the router: returns (h, router logits)."""
    if router is None:
        return F.linear(x, down), None
    weight = torch.cat([down, router.weight])  # (r + E, in)
    bias = F.pad(router.bias, (down.shape[0], 0))  # zeros for the r down rows
    h, logits = F.linear(x, weight, bias).split([down.shape[0], router.out_features], dim=-1)
    return h, logits
