"""Time and class embeddings shared by the nets."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Transformer sinusoidal embedding (Vaswani et al. 2017) of t scaled to [0, 1000] as in DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


class ClassEmbedding(nn.Module):
    """Learned label embedding with one extra row for the null class (label -1, CFG's unconditional branch)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, cond: Tensor | None, batch: int, device) -> Tensor:
        if cond is None:
            cond = torch.full((batch,), -1, device=device, dtype=torch.long)
        return self.table(torch.where(cond < 0, self.num_classes, cond))
