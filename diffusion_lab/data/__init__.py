"""LightningDataModules yielding {"x": tensor, "cond": labels or None}; normalisation lives here."""

from diffusion_lab.data.celeba import CelebA64DataModule
from diffusion_lab.data.imagefolder import ImageFolderDataModule
from diffusion_lab.data.images import CIFAR10DataModule, ImageDataModule, MNISTDataModule, from_uint8, to_uint8
from diffusion_lab.data.lowdim import Gmm1dDataModule, PointsDataModule, StatesDataModule, ToyDataModule

__all__ = ["CIFAR10DataModule", "CelebA64DataModule", "Gmm1dDataModule", "ImageDataModule", "ImageFolderDataModule",
           "MNISTDataModule", "PointsDataModule", "StatesDataModule", "ToyDataModule", "from_uint8", "to_uint8"]
