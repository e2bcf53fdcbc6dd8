"""LightningDataModules yielding raw items {"x": uint8 images or points, "cond"}; the space maps them."""

from diffusion_lab.data.celeba import CelebA64DataModule
from diffusion_lab.data.imagefolder import ImageFolderDataModule
from diffusion_lab.data.images import CIFAR10DataModule, ImageDataModule, MNISTDataModule
from diffusion_lab.data.lowdim import Gmm1dDataModule, PointsDataModule, StatesDataModule, ToyDataModule
from diffusion_lab.spaces import from_uint8, to_uint8  # the pixel space's map, kept importable from data

__all__ = ["CIFAR10DataModule", "CelebA64DataModule", "Gmm1dDataModule", "ImageDataModule", "ImageFolderDataModule",
           "MNISTDataModule", "PointsDataModule", "StatesDataModule", "ToyDataModule", "from_uint8", "to_uint8"]
