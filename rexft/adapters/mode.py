"""MoDE, mixture of dyadic experts: one shared down-projection, m rank-one up-vector atoms per rank.

    h = A x                                   A: (r, in), row a_j
    R_j(x) = softmax over i of (W_R x)_(j, i)  (r, m): each rank position mixes its own m atoms
    delta(x) = s * sum_j sum_i R_j^i(x) h_j b_j^i      b_j^i: column (j, i) of B: (out, r*m)

With m = 1 every R_j = 1 and this is LoRA with B's columns as the up-projection.
"""

import torch
import torch.nn as nn

from rexft.adapters.base import AdapterLinear, fused_down, kaiming_, lora_scaling, sparse_softmax


class MoDELinear(AdapterLinear):
    is_mixture = True

    def __init__(self, base, cfg):
        super().__init__(base, cfg)
        self.r, self.m, self.top_k = cfg.r, cfg.num_experts, cfg.top_k
        self.scaling = lora_scaling(cfg, cfg.r)
        self.rex_A = nn.Parameter(kaiming_(torch.empty(cfg.r, self.in_features, dtype=self.dtype)))
        self.rex_B = nn.Parameter(torch.zeros(self.out_features, cfg.r * cfg.num_experts, dtype=self.dtype))
        self.rex_router = nn.Linear(self.in_features, cfg.r * cfg.num_experts, dtype=self.dtype)

    def coefficients(self, x):
        h, logits = fused_down(x, self.rex_A, self.rex_router)  # (b, s, r), (b, s, r*m)
        route = sparse_softmax(logits.unflatten(-1, (self.r, self.m)), self.top_k)  # (b, s, r, m)
        self.observe(route.flatten(-2), route)
        return (h.unsqueeze(-1) * route).flatten(-2) * self.scaling  # (b, s, r*m)

    def static_factors(self, mean_route):
        atoms = self.rex_B.detach().unflatten(1, (self.r, self.m))  # (out, r, m)
        weights = mean_route.to(atoms).view(self.r, self.m)
        return self.rex_A.detach(), self.scaling * torch.einsum("ojm,jm->oj", atoms, weights)
