"""LoRA-MoE (molora): E LoRA experts mixed by a token router.

    g(x) = softmax(W_g x)                      (E,), optionally top-k
    delta(x) = s * sum_e g_e(x) B_e A_e x      A_e: (r, in), B_e: (out, r)

Stacked as A_all: (E*r, in) and B_all: (out, E*r), so the mixture is two matmuls:
h = A_all x (computed in one matmul with the router), coef = g (x) h per expert block, delta = s B_all coef.
With E = 1 this is LoRA.
"""

import torch
import torch.nn as nn

from rexft.adapters.base import AdapterLinear, fused_down, kaiming_, lora_scaling, sparse_softmax


class MoLoRALinear(AdapterLinear):
    is_mixture = True

    def __init__(self, base, cfg):
        super().__init__(base, cfg)
        self.r, self.num_experts, self.top_k = cfg.r, cfg.num_experts, cfg.top_k
        self.scaling = lora_scaling(cfg, cfg.r)
        self.rex_A = nn.Parameter(kaiming_(torch.empty(cfg.num_experts * cfg.r, self.in_features, dtype=self.dtype)))
        self.rex_B = nn.Parameter(torch.zeros(self.out_features, cfg.num_experts * cfg.r, dtype=self.dtype))
        self.rex_router = nn.Linear(self.in_features, cfg.num_experts, dtype=self.dtype)

    def coefficients(self, x):
        h, logits = fused_down(x, self.rex_A, self.rex_router)  # (b, s, E*r), (b, s, E)
        gates = sparse_softmax(logits, self.top_k)  # (b, s, E)
        self.observe(gates, gates)
        return (h.unflatten(-1, (self.num_experts, self.r)) * gates.unsqueeze(-1)).flatten(-2) * self.scaling  # (b, s, E*r)

    def static_factors(self, mean_route):
        gates = mean_route.to(self.rex_B).repeat_interleave(self.r)  # (E*r,)
        return self.rex_A.detach(), self.scaling * self.rex_B.detach() * gates
