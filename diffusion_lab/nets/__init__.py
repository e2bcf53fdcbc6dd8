"""Plain nn.Modules: denoisers and classifiers with forward(x, t, cond=None), t in [0, 1] (0 data, 1 noise);
the KL-autoencoder of latent diffusion (encode / decode) and its PatchGAN discriminator."""

from diffusion_lab.nets.autoencoder import KLAutoencoder, PatchDiscriminator
from diffusion_lab.nets.classifier import ConvClassifier, MLPClassifier
from diffusion_lab.nets.dit import DiT
from diffusion_lab.nets.mlp import MLP
from diffusion_lab.nets.simple_unet import SimpleUNet
from diffusion_lab.nets.unet import UNet

__all__ = ["KLAutoencoder", "PatchDiscriminator", "DiT", "MLP", "ConvClassifier", "MLPClassifier", "SimpleUNet", "UNet"]
