"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

The image (pixels or latents) is cut into p x p patches, each a token; N = (image_size / p)**2 tokens of
width `hidden_size` pass through `depth` adaLN-Zero transformer blocks conditioned on the timestep (+ class)
embedding, and a final adaLN layer maps every token back to a p x p x C patch.

Differences from the reference code, on purpose:
- No learned sigma: the suite's objectives predict eps / x0 / v / velocity, so the output has the input's
  channels (the paper's param counts include the 2x output head; the difference is < 0.1%).
- Classifier-free guidance is not inside the net: the suite's guided_net combines the conditional and the
  unconditional output on every channel (the reference forward_with_cfg guides only the first 3 channels).
- The label table has one extra row for the suite's null label -1 (ClassEmbedding); label dropout for CFG
  lives in the objective (objective.p_uncond), not in the net.
- t in [0, 1] (0 data, 1 noise) like every net here; the sinusoidal embedding scales it to [0, 1000].

Sizes (Table 1 of the paper) are in DIT_SIZES; GFLOPs of one forward on a 32x32x4 latent, one multiply-add
= one FLOP: S/2 6.06, B/2 23.0, L/2 80.7, XL/2 118.6 (tests/test_nets.py checks them and the parameter counts).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from diffusion_lab.nets.embeddings import ClassEmbedding, sinusoidal_embedding

# name -> (depth, hidden_size, num_heads), Peebles & Xie 2023 Table 1
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
FREQ_DIM = 256  # width of the sinusoidal timestep features fed to the timestep MLP (as in DiT)


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2D sin-cos position embedding (MAE / DiT): half the channels encode the row, half the column.

    Returns (grid*grid, dim), tokens in row-major order (the order of patchify's flatten)."""
    if dim % 4:
        raise ValueError(f"hidden_size={dim}: expected a multiple of 4 for the 2D sin-cos position embedding")
    omega = 1.0 / 10_000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # (grid, grid) each

    def embed(coord: Tensor) -> Tensor:  # (grid*grid,) -> (grid*grid, dim/2)
        args = coord.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    return torch.cat([embed(rows), embed(cols)], dim=1).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift per sample; (B, N, D) with (B, D) parameters broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention over the tokens (ViT's: one qkv Linear with bias, an output projection)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D/heads); LayerNorm keeps logits tame
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: shift/scale before attention and MLP, a gate on each residual
    branch, all six regressed from the conditioning and zero-initialised so the block starts as the identity."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # affine comes from adaLN
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate) then a Linear from each token to its p*p*C patch values."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """DiT with forward(x, t, cond): x (B, C, H, W), t (B,) in [0, 1], cond (B,) labels or None (-1 = null).

    `size` picks depth / hidden_size / num_heads from DIT_SIZES; explicit depth / hidden_size / num_heads
    override it (the ImageNet-100 seed's depth-8 and depth-12 DiTs, CPU-sized nets)."""

    def __init__(self, in_channels: int = 4, image_size: int = 32, patch_size: int = 2, size: str | None = "S",
                 depth: int | None = None, hidden_size: int | None = None, num_heads: int | None = None,
                 mlp_ratio: float = 4.0, num_classes: int = 0):
        super().__init__()
        if size is not None and size not in DIT_SIZES:
            raise ValueError(f"size={size}: expected one of {', '.join(DIT_SIZES)} (or null with depth, "
                             "hidden_size and num_heads given)")
        base = DIT_SIZES.get(size, (None, None, None))
        given = (depth, hidden_size, num_heads)
        depth, hidden_size, num_heads = (v if v is not None else b for v, b in zip(given, base))
        if None in (depth, hidden_size, num_heads):
            raise ValueError("size=null: expected depth, hidden_size and num_heads to be given")
        self._check(in_channels, image_size, patch_size, depth, hidden_size, num_heads, mlp_ratio, num_classes)
        self.in_channels, self.image_size, self.patch_size = in_channels, image_size, patch_size
        self.num_classes, self.hidden_size, self.depth, self.num_heads = num_classes, hidden_size, depth, num_heads
        self.grid = image_size // patch_size

        # patchify: a conv with kernel = stride = p is a Linear applied to every non-overlapping patch
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, patch_size)
        # fixed, not learned (as in DiT); a buffer so it follows .to() but is not trained or checkpointed
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(FREQ_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.cond_embed = ClassEmbedding(num_classes, hidden_size) if num_classes > 0 else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(hidden_size, patch_size, in_channels)
        self._init_weights()

    @staticmethod
    def _check(in_channels, image_size, patch_size, depth, hidden_size, num_heads, mlp_ratio, num_classes):
        """Fail at construction with one line naming the argument, not deep inside forward."""
        if min(in_channels, image_size, patch_size, depth, hidden_size, num_heads) < 1 or num_classes < 0:
            raise ValueError(f"in_channels={in_channels}, image_size={image_size}, patch_size={patch_size}, "
                             f"depth={depth}, hidden_size={hidden_size}, num_heads={num_heads}, "
                             f"num_classes={num_classes}: expected positive values (num_classes >= 0)")
        if image_size % patch_size:
            raise ValueError(f"patch_size={patch_size}: must divide image_size={image_size} (whole patches)")
        if hidden_size % num_heads:
            raise ValueError(f"num_heads={num_heads}: must divide hidden_size={hidden_size}")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio={mlp_ratio}: expected > 0")

    def _init_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform Linears (and the patch conv viewed as one), N(0, 0.02)
        embeddings, and adaLN-Zero: every modulation Linear and the output Linear start at exactly zero, so
        each block is the identity and the net outputs 0 (a well-scaled start for every objective)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.t_embed[0].weight, std=0.02)
        nn.init.normal_(self.t_embed[2].weight, std=0.02)
        if self.cond_embed is not None:
            nn.init.normal_(self.cond_embed.table.weight, std=0.02)
        for layer in [*(b.ada[-1] for b in self.blocks), self.final.ada[-1], self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, p*p*C) tokens -> (B, C, H, W): token (i, j) fills rows i*p.. and columns j*p.. ."""
        b, p, g, c = x.shape[0], self.patch_size, self.grid, self.in_channels
        x = x.reshape(b, g, g, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, g * p, g * p)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if x.ndim != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"DiT expects x of shape (B, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}), got {tuple(x.shape)}")
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)  # (B, N, D)
        c = self.t_embed(sinusoidal_embedding(t, FREQ_DIM).to(h.dtype))  # (B, D)
        if self.cond_embed is not None:
            c = c + self.cond_embed(cond, x.shape[0], x.device).to(c.dtype)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final(h, c))  # (B, C, H, W)

    def extra_repr(self) -> str:
        params = sum(p.numel() for p in self.parameters())
        return (f"tokens={self.grid ** 2} (patch {self.patch_size}), depth={self.depth}, "
                f"hidden={self.hidden_size}, heads={self.num_heads}, params={params:,}")

