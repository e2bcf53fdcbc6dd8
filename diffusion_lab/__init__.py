"""diffusion_lab: Lightning + Hydra experiment suite for diffusion and flow-matching models."""

__version__ = "0.1.0"
