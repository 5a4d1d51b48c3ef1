"""LoRA (Hu et al., 2021): the baseline.

    delta(x) = s * B A x,    A: (r, in), B: (out, r), s = alpha / r (alpha / sqrt(r) with rslora)

A is Kaiming-uniform, B is zero, so the model is unchanged at initialisation.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from rexft.adapters.base import AdapterLinear, kaiming_, lora_scaling


class LoRALinear(AdapterLinear):
    def __init__(self, base, cfg):
        super().__init__(base, cfg)
        self.scaling = lora_scaling(cfg, cfg.r)
        self.rex_A = nn.Parameter(kaiming_(torch.empty(cfg.r, self.in_features, dtype=self.dtype)))
        self.rex_B = nn.Parameter(torch.zeros(self.out_features, cfg.r, dtype=self.dtype))

    def coefficients(self, x):
        return F.linear(x, self.rex_A) * self.scaling  # (b, s, r)

    def static_factors(self, mean_route=None):
        return self.rex_A.detach(), self.scaling * self.rex_B.detach()
