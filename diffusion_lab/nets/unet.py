"""The DDPM U-Net (Ho et al. 2020, App. B) with ADM's optional class embedding (Dhariwal & Nichol 2021).

PixelCNN++-style wide ResNet levels, self-attention at chosen resolutions, skips concatenated per
ResBlock, a sinusoidal time embedding injected into every ResBlock. The CIFAR-10 configuration
(ch 128, mult 1,2,2,2, attention at 16x16, 2 ResBlocks, dropout 0.1) has Ho et al.'s 35.7M parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from diffusion_lab.nets.embeddings import ClassEmbedding, sinusoidal_embedding

GROUPS = 32  # GroupNorm(32) throughout, as in Ho et al.


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=1e-6)


class ResBlock(nn.Module):
    """Wide ResNet block (Zagoruyko & Komodakis 2016) with the time embedding added after the first conv."""

    def __init__(self, cin: int, cout: int, temb_dim: int, dropout: float):
        super().__init__()
        self.block1 = nn.Sequential(_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, 1, 1))
        self.temb_proj = nn.Sequential(nn.SiLU(), nn.Linear(temb_dim, cout))
        self.block2 = nn.Sequential(_norm(cout), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, 1, 1))
        # 1x1 projection only where the residual cannot be added as is (Ho et al.'s nin_shortcut)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.block1(x)
        h = h + self.temb_proj(temb)[:, :, None, None]  # (B, cout, 1, 1): broadcast over pixels
        return self.skip(x) + self.block2(h)


class AttnBlock(nn.Module):
    """Spatial self-attention (Vaswani et al. 2017) over H*W tokens with a residual; softmax in fp32."""

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads}: must divide the channel count {channels}")
        self.num_heads = num_heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)  # same parameters as Ho et al.'s separate q, k, v
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, C/heads)
        # bf16/fp16 logits over HW tokens overflow or lose the softmax's precision (NaNs in practice),
        # so attend in fp32 with autocast off (autocast would otherwise recast SDPA's inputs down).
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        out = out.to(qkv.dtype).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Halve the resolution: 3x3 conv stride 2 (or 2x2 average pooling)."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 1) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) if self.conv is not None else F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour then 3x3 conv (avoids transposed-conv checkerboards)."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class Level(nn.Module):
    """One resolution of the U-Net: ResBlocks (each optionally followed by attention), then resampling."""

    def __init__(self, blocks: list[ResBlock], attns: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.blocks, self.attns, self.resample = nn.ModuleList(blocks), nn.ModuleList(attns), resample


class UNet(nn.Module):
    """DDPM U-Net (Ho et al. 2020) with ADM-style class embedding (Dhariwal & Nichol 2021); null label -1."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1, num_classes: int = 0,
                 num_heads: int = 1, resamp_with_conv: bool = True):
        super().__init__()
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        self._check(in_channels, image_size, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, num_classes)
        self.in_channels, self.image_size, self.ch, self.num_classes = in_channels, image_size, ch, num_classes
        temb_dim = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.cond_embed = ClassEmbedding(num_classes, temb_dim) if num_classes > 0 else None
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)

        def attn(c: int, res: int) -> nn.Module:
            return AttnBlock(c, num_heads) if res in attn_resolutions else nn.Identity()

        # Down path; `skips` records the channels of every tensor pushed on the skip stack.
        skips, c, res = [ch], ch, image_size
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(c, ch * mult, temb_dim, dropout))
                c = ch * mult
                attns.append(attn(c, res))
                skips.append(c)
            last = i == len(ch_mult) - 1
            self.down.append(Level(blocks, attns, None if last else Downsample(c, resamp_with_conv)))
            if not last:
                res //= 2
                skips.append(c)

        self.mid = nn.ModuleList([ResBlock(c, c, temb_dim, dropout), AttnBlock(c, num_heads),
                                  ResBlock(c, c, temb_dim, dropout)])

        # Up path: one more ResBlock per level than going down, so every skip is consumed once.
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(ch_mult))):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(c + skips.pop(), ch * mult, temb_dim, dropout))
                c = ch * mult
                attns.append(attn(c, res))
            self.up.append(Level(blocks, attns, Upsample(c, resamp_with_conv) if i > 0 else None))
            if i > 0:
                res *= 2
        assert not skips, "skip bookkeeping out of sync"

        self.out = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, in_channels, 3, 1, 1))
        # zero-init the output conv (Ho et al.'s init_scale=0, ADM's zero_module): the untrained net
        # predicts 0, a well-scaled start for any objective
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @staticmethod
    def _check(in_channels, image_size, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, num_classes):
        """Fail at construction with one line naming the argument, not deep inside forward."""
        if in_channels < 1 or num_res_blocks < 1 or num_classes < 0 or not ch_mult or min(ch_mult) < 1:
            raise ValueError(f"in_channels={in_channels}, num_res_blocks={num_res_blocks}, ch_mult={ch_mult}, "
                             f"num_classes={num_classes}: expected positive values (num_classes >= 0)")
        if ch < GROUPS or ch % GROUPS:
            raise ValueError(f"ch={ch}: expected a multiple of {GROUPS} (GroupNorm({GROUPS}))")
        factor = 2 ** (len(ch_mult) - 1)
        if image_size % factor:
            raise ValueError(f"image_size={image_size}: must be divisible by 2**(len(ch_mult)-1)={factor} "
                             f"so the up path meets the skips at the same sizes")
        reached = {image_size // 2**i for i in range(len(ch_mult))}
        if not set(attn_resolutions) <= reached:
            raise ValueError(f"attn_resolutions={list(attn_resolutions)}: not among the resolutions "
                             f"{sorted(reached, reverse=True)} of a {image_size}x{image_size} input")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout}: expected 0 <= dropout < 1")

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if x.ndim != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"UNet expects x of shape (B, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}), got {tuple(x.shape)}")
        temb = self.temb(sinusoidal_embedding(t, self.ch).to(x.dtype))  # (B, 4ch); t scaled to [0, 1000]
        if self.cond_embed is not None:
            temb = temb + self.cond_embed(cond, x.shape[0], x.device).to(temb.dtype)
        hs = [self.conv_in(x)]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                hs.append(attn(block(hs[-1], temb)))
            if level.resample is not None:
                hs.append(level.resample(hs[-1]))
        h = hs[-1]
        h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
        for level in self.up:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), temb))
            if level.resample is not None:
                h = level.resample(h)
        return self.out(h)
