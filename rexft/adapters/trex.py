"""T-REX: mixture of rank-one experts with semantic-aware intuition.

r1 down vectors a_i (rows of A: (r1, in)) and r2 up vectors b_j (columns of B: (out, r2)) make r1*r2
rank-one experts b_j a_i^T, mixed per token by a routing matrix M(x) of shape (r1, r2):

    h = A x                                            (r1,)
    M = softmax(router(x)) * omega * c_token + p * (1 - omega) * c_task      reshaped to (r1, r2)
    z_j = sum_i h_i M_ij                               (r2,)
    delta(x) = gate * B z

router = Linear(in, r1*r2), zero-initialised (uniform softmax at start); omega = sigmoid(s * w_omega)
and gate = sigmoid(s * w_gate) with w = 0 at init; p is the example's prior (similarities to the k
cluster centroids), used as is when k == r1*r2, else through a learned Linear(k, r1*r2).

``rank1`` mode: r1 = r2 = r and M is diagonal (r experts, z = h * m). ``top_k`` keeps the k largest router
logits per token before the softmax. ``use_prior=false`` is the "intuition" ablation; ``use_router=false``
routes by the prior alone. Expert count grows as r1*r2 while parameters grow as r1*in + r2*out.
"""

import torch
import torch.nn as nn

from rexft.adapters.base import AdapterLinear, fused_down, kaiming_, sparse_softmax
from rexft.errors import RexftError


class TRexLinear(AdapterLinear):
    is_mixture = True

    def __init__(self, base, cfg):
        super().__init__(base, cfg)
        if not (cfg.use_router or cfg.use_prior):
            raise RexftError("adapter: trex needs adapter.use_router or adapter.use_prior (both are false)")
        self.flex = cfg.mode == "rank1_flex"
        self.r1, self.r2 = (cfg.r1, cfg.r2) if self.flex else (cfg.r, cfg.r)
        self.num_routes = self.r1 * self.r2 if self.flex else self.r1
        self.c_token, self.c_task, self.s, self.top_k = cfg.c_token, cfg.c_task, cfg.s, cfg.top_k
        self.use_prior, self.use_router = cfg.use_prior, cfg.use_router
        self.rex_A = nn.Parameter(kaiming_(torch.empty(self.r1, self.in_features, dtype=self.dtype)))
        self.rex_B = nn.Parameter(torch.zeros(self.out_features, self.r2, dtype=self.dtype))
        # shape (1,), not (): DeepSpeed cannot broadcast 0-dim parameters
        self.rex_w_omega = nn.Parameter(torch.zeros(1, dtype=self.dtype))
        self.rex_w_gate = nn.Parameter(torch.zeros(1, dtype=self.dtype))
        self.rex_router = None
        if self.use_router:
            self.rex_router = nn.Linear(self.in_features, self.num_routes, dtype=self.dtype)
            nn.init.zeros_(self.rex_router.weight)
            nn.init.zeros_(self.rex_router.bias)
        self.prior_dim = cfg.prior_dim
        self.rex_prior_proj = None
        if self.use_prior and cfg.prior_dim != self.num_routes:
            self.rex_prior_proj = nn.Linear(cfg.prior_dim, self.num_routes, dtype=self.dtype)

    @property
    def omega(self):
        return torch.sigmoid(self.s * self.rex_w_omega)

    @property
    def gate(self):
        return torch.sigmoid(self.s * self.rex_w_gate)

    def routing(self, logits: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """M flattened: (b, s, num_routes), and the router probabilities (for the balance loss)."""
        omega = self.omega
        route, probs = None, None
        if self.use_router:
            probs = sparse_softmax(logits, self.top_k)  # (b, s, E)
        if self.use_prior:
            prior = self.batch_prior(x)  # (b, 1, k) or (b, s, k)
            if prior is None:
                raise RexftError("trex adapter with use_prior=true got no prior: call rexft.set_prior(model, prior) "
                                 "before the forward (or set adapter.use_prior=false)")
            if prior.shape[-1] != self.prior_dim:
                raise RexftError(f"trex adapter expects a prior of size {self.prior_dim} (adapter.prior_dim), got {prior.shape[-1]}")
            mapped = self.rex_prior_proj(prior) if self.rex_prior_proj is not None else prior  # (b, 1|s, E)
            route = mapped * ((1 - omega) * self.c_task)
        if probs is not None:
            token_weight = omega * self.c_token
            route = probs * token_weight if route is None else torch.addcmul(route, probs, token_weight)
        if route.shape[1] != x.shape[1]:  # prior only: the same route for every token
            route = route.expand(*x.shape[:-1], self.num_routes)
        return route, probs

    def coefficients(self, x):
        h, logits = fused_down(x, self.rex_A, self.rex_router)  # (b, s, r1), (b, s, E) or None
        route, probs = self.routing(logits, x)  # (b, s, E)
        self.observe(route, probs)
        if self.flex:
            # z_j = sum_i h_i M_ij; broadcast-and-sum beats per-token (1 x r1) @ (r1 x r2) matmuls
            z = (h.unsqueeze(-1) * route.unflatten(-1, (self.r1, self.r2))).sum(-2)  # (b, s, r1, r2) -> (b, s, r2)
        else:
            z = h * route  # (b, s, r): diagonal M
        return z * self.gate  # the gate scales z (r2 wide), not the (out,)-wide delta

    def static_factors(self, mean_route):
        """With constant M: delta(x) = gate * B M^T A x, so A' = A and B' = gate * B M^T (rank r1)."""
        matrix = mean_route.to(self.rex_B).view(self.r1, self.r2) if self.flex else torch.diag(mean_route.to(self.rex_B))
        return self.rex_A.detach(), self.gate.detach() * self.rex_B.detach() @ matrix.T
