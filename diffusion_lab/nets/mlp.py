"""MLP denoiser for low-dimensional data (CSE849: 4 hidden layers x 256, input [x, t_bar])."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffusion_lab.nets.embeddings import ClassEmbedding, sinusoidal_embedding


class MLP(nn.Module):
    """x (B, D), t (B,) -> (B, D). Time enters as t_bar = 2t - 1 (CSE849) or a sinusoidal embedding."""

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, time_embedding: str = "linear",
                 time_dim: int = 32, num_classes: int = 0, activation: str = "silu"):
        super().__init__()
        if time_embedding not in ("linear", "sinusoidal"):
            raise ValueError(f"time_embedding={time_embedding!r}: expected 'linear' or 'sinusoidal'")
        acts = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}
        if activation not in acts:
            raise ValueError(f"activation={activation!r}: expected one of {sorted(acts)}")
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"dim={dim}, hidden={hidden}, depth={depth}: expected positive integers")
        self.dim, self.time_embedding, self.time_dim = dim, time_embedding, time_dim
        self.num_classes = num_classes
        t_in = 1 if time_embedding == "linear" else time_dim
        self.cond_embed = ClassEmbedding(num_classes, hidden) if num_classes > 0 else None
        self.inp = nn.Linear(dim + t_in, hidden)
        layers = []
        for _ in range(depth - 1):
            layers += [acts[activation](), nn.Linear(hidden, hidden)]
        self.body = nn.Sequential(*layers, acts[activation]())
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        if self.time_embedding == "linear":
            temb = (2 * t - 1).to(x.dtype)[:, None]  # t_bar = 2(k - T/2)/T in CSE849's integer time
        else:
            temb = sinusoidal_embedding(t, self.time_dim).to(x.dtype)
        h = self.inp(torch.cat([x, temb], dim=1))
        if self.cond_embed is not None:
            h = h + self.cond_embed(cond, x.shape[0], x.device).to(h.dtype)
        return self.out(self.body(h))
