"""The CS180 Project 5B UNet (Berkeley CS180, 2024-25): a small conv UNet for 28x28 MNIST.

Layout (D hidden channels, image_size S = 28 by default):
    x -> ConvBlock(C, D)          conv0   (D, S, S)
      -> DownBlock(D, D)          down1   (D, S/2, S/2)
      -> DownBlock(D, 2D)         down2   (2D, S/4, S/4)
      -> Flatten (AvgPool)        flat    (2D, 1, 1)
      -> Unflatten                unflat  (2D, S/4, S/4)   <- c1 * unflat + t1
      -> UpBlock(cat 4D, D)       up1     (D, S/2, S/2)    <- c2 * up1 + t2
      -> UpBlock(cat 2D, D)       up2     (D, S, S)
      -> ConvBlock(cat 2D, D) -> Conv3x3(D, C)
The bottleneck is S // 4 (7 for 28, 8 for 32): the two stride-2 downsamples must land on it exactly,
so image_size must be a multiple of 4.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def _conv(cin: int, cout: int) -> nn.Sequential:
    """(1) Conv: 3x3, stride 1 -> BN -> GELU (resolution kept)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.GELU())


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    """(7) ConvBlock: two Convs, same shape contract as one Conv but deeper."""
    return nn.Sequential(_conv(cin, cout), _conv(cout, cout))


def _down_block(cin: int, cout: int) -> nn.Sequential:
    """(8) DownBlock: DownConv (3x3 stride 2 -> BN -> GELU) then ConvBlock."""
    down = nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.GELU())
    return nn.Sequential(down, _conv_block(cout, cout))


def _up_block(cin: int, cout: int) -> nn.Sequential:
    """(9) UpBlock: UpConv (ConvTranspose 4x4 stride 2 -> BN -> GELU) then ConvBlock."""
    up = nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout), nn.GELU())
    return nn.Sequential(up, _conv_block(cout, cout))


def _fc_block(cin: int, cout: int) -> nn.Sequential:
    """FCBlock: Linear -> GELU -> Linear, maps a conditioning vector to per-channel values."""
    return nn.Sequential(nn.Linear(cin, cout), nn.GELU(), nn.Linear(cout, cout))


class SimpleUNet(nn.Module):
    """CS180 Proj 5B UNet (Geng, Tabrizi, Gao): concat-skip conv UNet with FCBlock time/class modulation."""

    def __init__(self, in_channels: int = 1, hidden: int = 64, num_classes: int = 0, image_size: int = 28,
                 time_conditioning: bool = True):
        super().__init__()
        if in_channels < 1 or hidden < 1 or num_classes < 0:
            raise ValueError(f"in_channels={in_channels}, hidden={hidden}, num_classes={num_classes}: "
                             "expected positive channels and num_classes >= 0")
        if image_size < 4 or image_size % 4:
            raise ValueError(f"image_size={image_size}: expected a multiple of 4 (two stride-2 downsamples)")
        d, b = hidden, image_size // 4  # b: bottleneck side, 7 for MNIST
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.time_conditioning = time_conditioning
        self.conv0 = _conv_block(in_channels, d)
        self.down1 = _down_block(d, d)
        self.down2 = _down_block(d, 2 * d)
        # Flatten has no BN in the figure: BN over a 1x1 map would only see batch statistics.
        self.flatten = nn.Sequential(nn.AvgPool2d(b), nn.GELU())
        self.unflatten = nn.Sequential(nn.ConvTranspose2d(2 * d, 2 * d, b, b, 0), nn.BatchNorm2d(2 * d), nn.GELU())
        self.up1 = _up_block(4 * d, d)
        self.up2 = _up_block(2 * d, d)
        self.out = nn.Sequential(_conv_block(2 * d, d), nn.Conv2d(d, in_channels, 3, 1, 1))
        # fc1 modulates the 2D-channel unflatten, fc2 the D-channel up1 (section 2.1 / 2.4).
        self.fc1_t = _fc_block(1, 2 * d) if time_conditioning else None
        self.fc2_t = _fc_block(1, d) if time_conditioning else None
        self.fc1_c = _fc_block(num_classes, 2 * d) if num_classes > 0 else None
        self.fc2_c = _fc_block(num_classes, d) if num_classes > 0 else None

    def class_vector(self, cond: Tensor | None, batch: int, device) -> Tensor:
        """One-hot labels with the null label (-1) as the all-zeros vector (CS180's CFG dropout)."""
        if cond is None:
            cond = torch.full((batch,), -1, device=device, dtype=torch.long)
        onehot = F.one_hot(cond.clamp(min=0), self.num_classes).float()
        return onehot * (cond >= 0).float()[:, None]

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if x.ndim != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"SimpleUNet expects x of shape (B, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}), got {tuple(x.shape)}")
        conv0 = self.conv0(x)
        down1 = self.down1(conv0)
        down2 = self.down2(down1)
        unflat = self.unflatten(self.flatten(down2))
        unflat = self._modulate(unflat, self.fc1_c, self.fc1_t, t, cond)
        up1 = self.up1(torch.cat([down2, unflat], dim=1))
        # the CS180 pseudo-code adds t1 here; that is a typo (t1 has 2D channels, up1 has D): use t2
        up1 = self._modulate(up1, self.fc2_c, self.fc2_t, t, cond)
        up2 = self.up2(torch.cat([down1, up1], dim=1))
        return self.out(torch.cat([conv0, up2], dim=1))

    def _modulate(self, h: Tensor, fc_c: nn.Module | None, fc_t: nn.Module | None, t: Tensor,
                  cond: Tensor | None) -> Tensor:
        """h -> c * h + t_emb, with c = 1 when unconditional and t_emb = 0 for the part-1 denoiser."""
        if fc_c is not None:
            c = fc_c(self.class_vector(cond, h.shape[0], h.device).to(h.dtype))  # (B, channels)
            h = c[:, :, None, None] * h
        if fc_t is not None:
            h = h + fc_t(t.to(h.dtype)[:, None])[:, :, None, None]  # t already in [0, 1]
        return h
