"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "AutoencoderKL").

x (B, C, H, W) in [-1, 1] -> encoder -> a diagonal Gaussian posterior q(z | x) with (mean, logvar) of shape
(B, z, H/f, W/f), f = 2**(len(ch_mult) - 1) -> decoder -> x_hat. The structure follows the LDM / taming
Encoder and Decoder: ResNet blocks with GroupNorm + SiLU and no time embedding, stride-2 convolutions down,
nearest-neighbour + conv up, a middle ResNet-attention-ResNet block at the lowest resolution, optional
attention at chosen resolutions, and 1x1 "quant" convolutions between the encoder's moments and the latent.
With ch 128, ch_mult [1, 2, 4], 2 ResNet blocks and z 3 this is LDM's kl-f4 (55.3M parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

LOGVAR_RANGE = (-30.0, 20.0)  # LDM's clamp: keeps exp(logvar) finite for an untrained encoder


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """Pre-activation ResNet block (GroupNorm, SiLU, conv) x2 with a 1x1 shortcut when channels change."""

    def __init__(self, cin: int, cout: int, dropout: float, groups: int):
        super().__init__()
        self.block1 = nn.Sequential(_norm(cin, groups), nn.SiLU(), nn.Conv2d(cin, cout, 3, 1, 1))
        self.block2 = nn.Sequential(_norm(cout, groups), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, 1, 1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.block2(self.block1(x))


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over the H*W positions, residual; softmax in fp32."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # (B, HW, C)
        # bf16 logits over HW positions lose the softmax's precision: attend in fp32 with autocast off
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        return x + self.proj(out.to(x.dtype).transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with LDM's asymmetric (right/bottom) zero pad: H -> H/2 exactly."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, dropout: float, groups: int, attention: bool) -> nn.Sequential:
    attn = AttnBlock(channels, groups) if attention else nn.Identity()
    return nn.Sequential(ResBlock(channels, channels, dropout, groups), attn,
                         ResBlock(channels, channels, dropout, groups))


def _level(blocks: list[nn.Module], attn: bool, channels: int, groups: int) -> list[nn.Module]:
    """Interleave attention after every ResNet block of a level that has it."""
    out: list[nn.Module] = []
    for block in blocks:
        out += [block, AttnBlock(channels, groups)] if attn else [block]
    return out


class Encoder(nn.Module):
    """x (B, C, H, W) -> moments (B, 2z, H/f, W/f): levels of ResNet blocks, each but the last halving H, W."""

    def __init__(self, in_channels: int, image_size: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 z_channels: int, attn_resolutions: Sequence[int], dropout: float, groups: int, mid_attention: bool):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 3, 1, 1)]
        cin, res = ch, image_size
        for i, mult in enumerate(ch_mult):
            cout = ch * mult
            blocks = [ResBlock(cin if j == 0 else cout, cout, dropout, groups) for j in range(num_res_blocks)]
            layers += _level(blocks, res in attn_resolutions, cout, groups)
            cin = cout
            if i != len(ch_mult) - 1:
                layers.append(Downsample(cout))
                res //= 2
        layers += [_mid(cin, dropout, groups, mid_attention), _norm(cin, groups), nn.SiLU(),
                   nn.Conv2d(cin, 2 * z_channels, 3, 1, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    """z (B, z, H/f, W/f) -> x_hat (B, C, H, W): the encoder mirrored, num_res_blocks + 1 blocks per level."""

    def __init__(self, out_channels: int, image_size: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 z_channels: int, attn_resolutions: Sequence[int], dropout: float, groups: int, mid_attention: bool):
        super().__init__()
        cin = ch * ch_mult[-1]
        res = image_size // 2 ** (len(ch_mult) - 1)
        layers: list[nn.Module] = [nn.Conv2d(z_channels, cin, 3, 1, 1), _mid(cin, dropout, groups, mid_attention)]
        for i in reversed(range(len(ch_mult))):
            cout = ch * ch_mult[i]
            blocks = [ResBlock(cin if j == 0 else cout, cout, dropout, groups) for j in range(num_res_blocks + 1)]
            layers += _level(blocks, res in attn_resolutions, cout, groups)
            cin = cout
            if i != 0:
                layers.append(Upsample(cout))
                res *= 2
        layers += [_norm(cin, groups), nn.SiLU()]
        self.layers = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, 1, 1)  # its weight drives the GAN's adaptive weight

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(self.layers(z))


class KLAutoencoder(nn.Module):
    """LDM's AutoencoderKL: encode(x) -> (mean, logvar) of q(z | x), decode(z) -> x_hat, both in [-1, 1] scale."""

    def __init__(self, in_channels: int = 3, image_size: int = 128, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 3, attn_resolutions: Sequence[int] = (),
                 dropout: float = 0.0, norm_groups: int = 32, mid_attention: bool = True):
        super().__init__()
        ch_mult, attn_resolutions = tuple(int(m) for m in ch_mult), tuple(int(r) for r in attn_resolutions)
        factor = 2 ** (len(ch_mult) - 1)
        for key, value in (("in_channels", in_channels), ("ch", ch), ("num_res_blocks", num_res_blocks),
                           ("z_channels", z_channels), ("norm_groups", norm_groups)):
            if int(value) < 1:
                raise ValueError(f"{key}={value}: expected an integer >= 1")
        if not ch_mult or min(ch_mult) < 1:
            raise ValueError(f"ch_mult={list(ch_mult)}: expected a non-empty list of integers >= 1")
        if image_size < factor or image_size % factor:
            raise ValueError(f"image_size={image_size}: must be divisible by the downsampling factor "
                             f"f = 2**(len(ch_mult) - 1) = {factor}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout}: expected 0 <= dropout < 1")
        self.in_channels, self.image_size, self.z_channels, self.factor = in_channels, image_size, z_channels, factor
        args = (image_size, ch, ch_mult, num_res_blocks, z_channels, attn_resolutions, dropout, norm_groups,
                mid_attention)
        self.encoder = Encoder(in_channels, *args)
        self.decoder = Decoder(in_channels, *args)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)  # LDM's 1x1 maps around the latent
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(z_channels, H/f, W/f) of one image's latent."""
        side = self.image_size // self.factor
        return (self.z_channels, side, side)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x in [-1, 1] (B, C, H, W) -> (mean, logvar), each (B, z, H/f, W/f); logvar clamped to [-30, 20]."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: Tensor) -> Tensor:
        """z (B, z, H/f, W/f) -> x_hat (B, C, H, W) on the [-1, 1] pixel scale (not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def last_layer(self) -> Tensor:
        """The decoder's output conv weight: LDM's adaptive GAN weight compares gradient norms on it."""
        return self.decoder.conv_out.weight

    def forward(self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """(x_hat, mean, logvar): decode a posterior sample z = mean + std * eps (or the mean)."""
        mean, logvar = self.encode(x)
        z = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps
        return self.decode(z), mean, logvar


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over each sample's latent: 0.5 sum(mu^2 + var - 1 - logvar), (B,)."""
    mean, logvar = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (mean, logvar))  # bf16 -> fp32
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN (Isola et al. 2017), as taming/LDM use it: 4x4 convs, stride 2 for `layers` steps,
    BatchNorm + LeakyReLU(0.2), one logit per overlapping patch (B, 1, h, w); weights N(0, 0.02) as in DCGAN."""

    def __init__(self, in_channels: int = 3, ch: int = 64, layers: int = 3):
        super().__init__()
        if ch < 1 or layers < 1:
            raise ValueError(f"ch={ch}, layers={layers}: expected integers >= 1")
        mods: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        cin = ch
        for i in range(1, layers + 1):
            cout = ch * min(2 ** i, 8)
            stride = 2 if i < layers else 1  # the last block keeps the resolution (pix2pix's n_layers design)
            mods += [nn.Conv2d(cin, cout, 4, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]
            cin = cout
        mods.append(nn.Conv2d(cin, 1, 4, 1, 1))
        self.layers = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
