"""Low-dimensional DataModules: the whole dataset is one tensor, batches are index draws.

A torch DataLoader over 5000 two-dimensional points spends most of its time in per-item Python;
here an epoch is `steps_per_epoch` random batches drawn from a tensor that can live on the
training device, with a seeded generator whose position is checkpointable (exact resume).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch

from diffusion_lab.data import points as P
from diffusion_lab.domains import PointDomain


class InMemoryBatches:
    """Iterable of `steps` batches {"x", "cond"} drawn without replacement (reshuffled per pass).

    `transform` maps a stored batch to training form (e.g. uint8 -> [-1, 1] + random flip) on the
    device, per batch. `fixed=True` repeats the first batch (debug=overfit).
    """

    def __init__(self, x: torch.Tensor, cond: torch.Tensor | None, batch_size: int, steps: int, seed: int,
                 transform: Callable | None = None, fixed: bool = False):
        self.x, self.cond, self.batch_size, self.steps, self.seed = x, cond, batch_size, steps, seed
        self.transform, self.fixed = transform, fixed
        self.epoch, self.position = 0, 0  # position: batches already yielded in the current epoch

    def __len__(self) -> int:
        return self.steps

    def to(self, device) -> InMemoryBatches:
        self.x = self.x.to(device)
        self.cond = None if self.cond is None else self.cond.to(device)
        return self

    def _indices(self):
        """The epoch's index batches, a pure function of (seed, epoch): resumable at any position."""
        n = self.x.shape[0]
        g = torch.Generator(device=self.x.device).manual_seed(self.seed * 100_003 + self.epoch)
        perm, pos = torch.randperm(n, generator=g, device=self.x.device), 0
        for _ in range(self.steps):
            if self.fixed:
                yield perm[: self.batch_size]
                continue
            if pos + self.batch_size > n:  # start a new pass over the data
                perm, pos = torch.randperm(n, generator=g, device=self.x.device), 0
            yield perm[pos: pos + self.batch_size]
            pos += self.batch_size

    def __iter__(self):
        if self.position >= self.steps:
            # The previous epoch was fully consumed but its generator never exhausted: Lightning knows
            # len() and stops calling next() after the last batch. Start the next epoch here (without
            # this every other epoch would skip all its batches and come out empty).
            self.epoch, self.position = self.epoch + 1, 0
        skip = self.position  # > 0 only right after load_state_dict (mid-epoch resume)
        for i, idx in enumerate(self._indices()):
            if i < skip:
                continue
            self.position = i + 1
            batch = {"x": self.x[idx], "cond": None if self.cond is None else self.cond[idx]}
            yield self.transform(batch, self.seed * 7919 + self.epoch * 100_003 + i) if self.transform else batch
        self.epoch, self.position = self.epoch + 1, 0

    # Lightning saves/restores these with the fit loop (stateful iterables), so a resumed run
    # continues with the same batch order as an uninterrupted one.
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state.get("position", 0))


def rank_seed(datamodule: L.LightningDataModule) -> int:
    """The batch-order seed of this process: DDP ranks draw different batches (no DataLoader, so no
    DistributedSampler); one process keeps `seed` itself."""
    trainer = getattr(datamodule, "trainer", None)
    return int(datamodule.seed) + 1_000_003 * int(getattr(trainer, "global_rank", 0) or 0)


class HeldoutBatches:
    """A held-out split as fixed batches {"x", "cond"} in stored order (validation loaders): every pass is the
    same, so a validation curve moves only when the model does. `transform` maps a batch (e.g. uint8 -> [-1, 1])."""

    def __init__(self, x: torch.Tensor, cond: torch.Tensor | None, batch_size: int,
                 transform: Callable | None = None):
        self.x, self.cond, self.batch_size, self.transform = x, cond, max(1, int(batch_size)), transform

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.x), self.batch_size):
            batch = {"x": self.x[i: i + self.batch_size],
                     "cond": None if self.cond is None else self.cond[i: i + self.batch_size]}
            yield self.transform(batch) if self.transform else batch


class PointsDataModule(L.LightningDataModule):
    """Points (N, D) with optional integer labels, from a loader callable returning (data, labels, names).

    The held-out split (validation curves, classifier accuracy, the sample-based distances) comes from
    `heldout` (a second loader) or, when there is none and heldout_fraction > 0, from a seeded per-class
    split of the source; the split-off points are then left out of training. The KDE reference of the
    STATES protocol is always every point of the source (`reference()`), split or not.
    """

    domain = PointDomain()  # how samples of these data are saved, drawn and scored
    val_split = "heldout"  # the split that validation loops and classifier accuracy use
    cache_latents = False  # points have no latent space to cache

    def __init__(self, source: Callable, dim: int, num_classes: int = 0, batch_size: int = 5000,
                 steps_per_epoch: int = 100, heldout: Callable | None = None, seed: int = 0,
                 name: str = "points", overfit: bool = False, heldout_fraction: float = 0.0, heldout_seed: int = 0,
                 label_names: list[str] | None = None, val_batch_size: int = 4096):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected an integer >= 1")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch={steps_per_epoch}: expected an integer >= 1")
        if not 0 <= heldout_fraction < 1:
            raise ValueError(f"heldout_fraction={heldout_fraction}: expected 0 (no split) or a fraction in (0, 1)")
        if label_names is not None and len(label_names) != num_classes:
            raise ValueError(f"label_names={list(label_names)}: expected num_classes={num_classes} names")
        self.source, self.heldout_source = source, heldout
        self.dim, self.num_classes, self.name = dim, num_classes, name
        self.batch_size, self.steps_per_epoch, self.seed = batch_size, steps_per_epoch, seed
        self.heldout_fraction, self.heldout_seed, self.val_batch_size = heldout_fraction, heldout_seed, val_batch_size
        self.label_names = None if label_names is None else [str(n) for n in label_names]
        self.overfit = overfit
        self.data: torch.Tensor | None = None
        self._loader: InMemoryBatches | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        data, labels, names = _unpack(self.source())
        if data.ndim != 2 or data.shape[1] != self.dim:
            raise ValueError(f"data.dim={self.dim} but the source yields points of shape {tuple(data.shape)}")
        if labels is not None and self.num_classes and int(labels.max()) >= self.num_classes:
            raise ValueError(f"data.num_classes={self.num_classes} but labels go up to {int(labels.max())}")
        if names is not None and self.label_names is not None and list(names) != self.label_names:
            raise ValueError(f"data.label_names={self.label_names} but the points file names its classes "
                             f"{list(names)} (in label order)")
        self.reference_data, self.reference_labels = data, labels
        self.heldout, self.heldout_labels = None, None
        if self.heldout_source is not None:
            self.heldout, self.heldout_labels = _unpack(self.heldout_source())[:2]
        elif self.heldout_fraction > 0:
            train, held = P.split_heldout(data.numpy(), None if labels is None else labels.numpy(),
                                          self.heldout_fraction, self.heldout_seed)
            self.heldout, self.heldout_labels = data[held], None if labels is None else labels[held]
            data, labels = data[train], None if labels is None else labels[train]
        self.data, self.labels = data, labels
        self.class_names = self.label_names or (list(names) if names else [str(i) for i in range(self.num_classes)])

    def to_device(self, device) -> None:
        """Move the in-memory training tensor (and its batches) to the training device."""
        self.train_dataloader().to(device)

    def train_dataloader(self) -> InMemoryBatches:
        if self._loader is None:
            self.setup()
            cond = self.labels if self.num_classes else None
            self._loader = InMemoryBatches(self.data, cond, min(self.batch_size, len(self.data)),
                                           self.steps_per_epoch, rank_seed(self), fixed=self.overfit)
        return self._loader

    def val_dataloader(self) -> HeldoutBatches | list:
        """The held-out split in fixed batches (empty without one: Lightning then skips validation)."""
        self.setup()
        if self.heldout is None:
            return []
        cond = self.heldout_labels if self.num_classes else None
        return HeldoutBatches(self.heldout, cond, self.val_batch_size)

    def has_split(self, split: str) -> bool:
        self.setup()
        return split in ("train", "all") or (split == "heldout" and self.heldout is not None)

    def reference(self) -> torch.Tensor:
        """All true points of the source (the KDE reference of the STATES protocol)."""
        self.setup()
        return self.reference_data

    def labelled(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """(points, labels) of a split: "train" (the training points), "heldout" (validation) or "all"
        (every point of the source, the protocol's per-class reference)."""
        self.setup()
        splits = {"train": (self.data, self.labels), "heldout": (self.heldout, self.heldout_labels),
                  "all": (self.reference_data, self.reference_labels)}
        if split not in splits:
            raise ValueError(f"split={split!r}: points data have {sorted(splits)}")
        x, y = splits[split]
        if x is None or y is None:
            raise ValueError(f"{self.name}: the {split} split has no class labels (a classifier needs them)")
        return x, y

    def describe(self) -> dict:
        self.setup()
        if self.heldout_source is not None:
            heldout_from = "held-out file"
        elif self.heldout is not None:
            heldout_from = f"seeded split: {self.heldout_fraction:g} of each class (seed {self.heldout_seed})"
        else:
            heldout_from = None
        return {"name": self.name, "n": len(self.reference_data), "train_n": len(self.data), "dim": self.dim,
                "num_classes": self.num_classes, "classes": list(self.class_names),
                "heldout_n": None if self.heldout is None else len(self.heldout), "heldout_from": heldout_from}


def _unpack(out) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    data, labels, *rest = out
    names = rest[0] if rest else None
    data = torch.as_tensor(np.asarray(data, dtype=np.float32))
    labels = None if labels is None else torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return data, labels, names


def _states_source(path: str | None):
    return (lambda: P.load_points_file(path)) if path else P.load_states_asset


def _check_file(key: str, path: str | None) -> None:
    # Checked when the config is instantiated, so a wrong path is one line before any work.
    if path is not None and not Path(path).is_file():
        raise ValueError(f"{key}={path}: file not found (expected a .pt or .npz points file with 'data' and "
                         "'labels'; data=cse849_states reads $DIFFUSION_LAB_DATA/cse849_states/states.pt)")


class StatesDataModule(PointsDataModule):
    """STATES (CSE849): 5 US-state outlines, 1000 points each; the shipped set or a points file.

    The shipped set has its own held-out draw; a points file without `heldout_path` gives up a seeded
    `heldout_fraction` of each state for validation (0: no held-out split; classifier training refuses).
    """

    def __init__(self, path: str | None = None, heldout_path: str | None = None, num_classes: int = 5,
                 batch_size: int = 5000, steps_per_epoch: int = 100, seed: int = 0, standardize: bool = False,
                 dim: int = 2, overfit: bool = False, label_names: list[str] | None = None,
                 heldout_fraction: float = 0.1, heldout_seed: int = 0, name: str = "states"):
        _check_file("path", path)
        _check_file("heldout_path", heldout_path)
        if path is None and heldout_path is None:
            heldout_path = str(P.STATES_ASSET.with_name("states_heldout.npz"))
        source = _states_source(path)
        if standardize:  # user files in other units: zero mean, unit std per axis
            raw = source
            source = lambda: _standardized(*raw())
        heldout = (lambda: P.load_points_file(heldout_path)) if heldout_path else None
        super().__init__(source, dim=dim, num_classes=num_classes, batch_size=batch_size,
                         steps_per_epoch=steps_per_epoch, heldout=heldout, seed=seed, name=name,
                         overfit=overfit, heldout_fraction=heldout_fraction, heldout_seed=heldout_seed,
                         label_names=label_names)


def _standardized(data, labels, names):
    data = np.asarray(data, dtype=np.float64)
    return ((data - data.mean(0)) / data.std(0)).astype(np.float32), labels, names


class Gmm1dDataModule(PointsDataModule):
    """1D Gaussian mixture playground; the true density is known (`density`)."""

    def __init__(self, means=(-2.0, 0.5, 3.0), stds=(0.4, 0.3, 0.6), weights=(0.3, 0.5, 0.2), n: int = 5000,
                 batch_size: int = 5000, steps_per_epoch: int = 100, seed: int = 0, num_classes: int = 0,
                 dim: int = 1, overfit: bool = False):
        self.means, self.stds = np.asarray(means, float), np.asarray(stds, float)
        self.weights = np.asarray(weights, float) / np.sum(weights)
        gen = lambda s: P.sample_gmm1d(n, means, stds, weights, seed=s)
        super().__init__(lambda: (*gen(seed), None), dim=dim, num_classes=num_classes, batch_size=batch_size,
                         steps_per_epoch=steps_per_epoch, heldout=lambda: (*gen(seed + 1), None), seed=seed,
                         name="gmm1d", overfit=overfit)

    def density(self, x: np.ndarray) -> np.ndarray:
        """Mixture pdf sum_k w_k N(x; mu_k, s_k^2)."""
        z = (x[..., None] - self.means) / self.stds
        return (self.weights * np.exp(-0.5 * z**2) / (self.stds * np.sqrt(2 * np.pi))).sum(-1)


class ToyDataModule(PointsDataModule):
    """Classic 2D toys (moons, eight gaussians, swiss roll) from a sampler `fn(n, seed=...)`."""

    def __init__(self, sampler: Callable, n: int = 5000, num_classes: int = 0, batch_size: int = 5000,
                 steps_per_epoch: int = 100, seed: int = 0, name: str = "toy", dim: int = 2,
                 overfit: bool = False):
        gen = lambda s: sampler(n, seed=s)
        super().__init__(lambda: (*gen(seed), None), dim=dim, num_classes=num_classes, batch_size=batch_size,
                         steps_per_epoch=steps_per_epoch, heldout=lambda: (*gen(seed + 1), None), seed=seed,
                         name=name, overfit=overfit)
