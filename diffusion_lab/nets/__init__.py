"""Plain nn.Modules with forward(x, t, cond=None); t in [0, 1] (0 data, 1 noise)."""

from diffusion_lab.nets.classifier import ConvClassifier, MLPClassifier
from diffusion_lab.nets.mlp import MLP
from diffusion_lab.nets.simple_unet import SimpleUNet
from diffusion_lab.nets.unet import UNet

__all__ = ["MLP", "ConvClassifier", "MLPClassifier", "SimpleUNet", "UNet"]
