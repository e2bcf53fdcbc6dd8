"""Classifier nets: forward(x, t=None) -> logits (B, num_classes); t in [0, 1] as for the denoisers.

A noise-conditional classifier (time_conditioning=True) sees (xt, t) and gives p(y | xt) for
classifier guidance; with time_conditioning=False it is an ordinary classifier of clean data (the
MNIST judge of conditional samples). `features` is the penultimate representation (Fréchet distance).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffusion_lab.nets.embeddings import sinusoidal_embedding

_ACTS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}


def _act(name: str) -> type[nn.Module]:
    if name not in _ACTS:
        raise ValueError(f"activation={name!r}: expected one of {sorted(_ACTS)}")
    return _ACTS[name]


class MLPClassifier(nn.Module):
    """CSE849's noisy STATES classifier: input [x, t_bar = 2t - 1], hidden layers 100-200-500, logits.

    SiLU by default rather than ReLU: guidance follows grad_x log p(y | xt), and a ReLU net's gradient
    field is piecewise constant with jumps; `activation=relu` gives the course's exact net.
    """

    def __init__(self, dim: int, num_classes: int, hidden: Sequence[int] = (100, 200, 500),
                 time_conditioning: bool = True, activation: str = "silu"):
        super().__init__()
        if dim < 1 or num_classes < 2 or not hidden or min(hidden) < 1:
            raise ValueError(f"dim={dim}, num_classes={num_classes}, hidden={list(hidden)}: expected dim >= 1, "
                             "num_classes >= 2 and positive hidden sizes")
        act = _act(activation)
        self.dim, self.num_classes, self.time_conditioning = dim, num_classes, time_conditioning
        sizes = [dim + int(time_conditioning), *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), act()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(sizes[-1], num_classes)

    def features(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLPClassifier expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        if self.time_conditioning:
            t = torch.zeros(x.shape[0], device=x.device) if t is None else t
            x = torch.cat([x, (2 * t - 1).to(x.dtype)[:, None]], dim=1)
        return self.body(x)

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        return self.head(self.features(x, t))


class _ConvLevel(nn.Module):
    """Two 3x3 conv + GroupNorm + activation; the time embedding is added after the first conv."""

    def __init__(self, cin: int, cout: int, temb_dim: int, act: type[nn.Module]):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(cin, cout, 3, 1, 1), nn.GroupNorm(min(8, cout), cout)
        self.conv2, self.norm2 = nn.Conv2d(cout, cout, 3, 1, 1), nn.GroupNorm(min(8, cout), cout)
        self.temb = nn.Linear(temb_dim, cout) if temb_dim else None
        self.act = act()

    def forward(self, h: Tensor, temb: Tensor | None) -> Tensor:
        h = self.conv1(h)
        if self.temb is not None:
            h = h + self.temb(temb).to(h.dtype)[:, :, None, None]
        h = self.act(self.norm1(h))
        return self.act(self.norm2(self.conv2(h)))


class ConvClassifier(nn.Module):
    """Small conv classifier for images: levels of two 3x3 convs, 2x2 max-pool between levels, global
    average pool, linear head. GroupNorm (no batch statistics: guidance differentiates single samples)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, widths: Sequence[int] = (32, 64, 128),
                 time_conditioning: bool = False, time_dim: int = 64, activation: str = "gelu"):
        super().__init__()
        if in_channels < 1 or num_classes < 2 or not widths or min(widths) < 1:
            raise ValueError(f"in_channels={in_channels}, num_classes={num_classes}, widths={list(widths)}: "
                             "expected positive channels and num_classes >= 2")
        if image_size < 2 ** (len(widths) - 1):
            raise ValueError(f"image_size={image_size}: too small for {len(widths)} levels (pooled 2x between)")
        act = _act(activation)
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.time_conditioning, self.time_dim = time_conditioning, time_dim
        temb_dim = 4 * time_dim if time_conditioning else 0
        self.time_mlp = (nn.Sequential(nn.Linear(time_dim, temb_dim), act(), nn.Linear(temb_dim, temb_dim))
                         if time_conditioning else None)
        chans = [in_channels, *widths]
        self.levels = nn.ModuleList(_ConvLevel(a, b, temb_dim, act) for a, b in zip(chans[:-1], chans[1:]))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(widths[-1], num_classes)

    def features(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        if x.ndim != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"ConvClassifier expects x of shape (B, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}), got {tuple(x.shape)}")
        temb = None
        if self.time_mlp is not None:
            t = torch.zeros(x.shape[0], device=x.device) if t is None else t
            temb = self.time_mlp(sinusoidal_embedding(t, self.time_dim).to(x.dtype))
        h = x
        for i, level in enumerate(self.levels):
            h = level(self.pool(h) if i else h, temb)
        return h.float().mean((2, 3))

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        return self.head(self.features(x, t))
