"""Plain nn.Modules with forward(x, t, cond=None); t in [0, 1] (0 data, 1 noise)."""

from diffusion_lab.nets.mlp import MLP

__all__ = ["MLP"]
