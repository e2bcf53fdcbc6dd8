"""LightningDataModules yielding {"x": tensor, "cond": labels or None}; normalisation lives here."""

from diffusion_lab.data.lowdim import Gmm1dDataModule, PointsDataModule, StatesDataModule, ToyDataModule

__all__ = ["Gmm1dDataModule", "PointsDataModule", "StatesDataModule", "ToyDataModule"]
