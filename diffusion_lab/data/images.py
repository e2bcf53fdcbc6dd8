"""Image DataModules: a dataset is one uint8 tensor (N, C, H, W); batches are seeded index draws in [-1, 1].

Keeping uint8 (4x smaller than float) lets CIFAR-10 (150 MB) or the CelebA-64 subset (~2.4 GB for all
of CelebA) sit in memory or on the training device, and removes per-item PIL work from the hot loop: the
random horizontal flip happens once per batch on the tensor. Batches stay uint8; the run's space
(diffusion_lab.spaces) maps them to model space ([-1, 1] pixels, or latents) on the training device.
With data.cache_latents=true the batches are cached posteriors of a frozen autoencoder instead (latents.py).

torchvision fetches (download=True, when files are missing), these readers parse the files on disk.
Reading ourselves means a read-only root works (MNIST .gz files are decoded in memory, nothing is
extracted) and files are not md5-checked on every start (torchvision checks md5 even with download=False).
Relative roots are relative to the launch directory (Hydra runs with hydra.job.chdir=false).
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from diffusion_lab.data.lowdim import HeldoutBatches, InMemoryBatches, rank_seed
from diffusion_lab.domains import ImageDomain
from diffusion_lab.errors import ConfigError
from diffusion_lab.latents import PickFlip
from diffusion_lab.safety import UnsafeFileError, restricted_pickle_load
from diffusion_lab.spaces import from_uint8  # the pixel space owns the [-1, 1] map

ROOT_HINT = "set data.root=<dir> or DIFFUSION_LAB_DATA"


def fetch_or_fail(present: Callable[[], bool], fetch: Callable[[], object] | None, download: bool,
                  missing: str) -> None:
    """Run `fetch` if files are missing and download is on; else raise a one-line FileNotFoundError."""
    if present():
        return
    if download and fetch is not None:
        try:
            fetch()
        except Exception as exc:  # no internet, quota, missing gdown: all mean "get it yourself"
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise FileNotFoundError(f"{missing} (download failed: {reason})") from exc
        if present():
            return
    raise FileNotFoundError(missing)


def load_image(path: str | Path, image_size: int, channels: int = 3, crop: int | None = None,
               center_crop: bool = True) -> torch.Tensor:
    """Decode one file to uint8 (C, S, S): optional centre crop, then resize shorter side + centre crop."""
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        if crop:
            im = _crop(im, crop, crop)
        if im.size != (image_size, image_size):
            if center_crop:  # keep the aspect ratio: shorter side -> image_size, then cut the centre
                w, h = im.size
                s = image_size / min(w, h)
                im = im.resize((max(image_size, round(w * s)), max(image_size, round(h * s))), Image.BICUBIC)
                im = _crop(im, image_size, image_size)
            else:
                im = im.resize((image_size, image_size), Image.BICUBIC)
        a = np.asarray(im, dtype=np.uint8).reshape(image_size, image_size, channels)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous()


def _crop(im: Image.Image, w: int, h: int) -> Image.Image:
    left, top = round((im.size[0] - w) / 2), round((im.size[1] - h) / 2)  # torchvision CenterCrop's rounding
    return im.crop((left, top, left + w, top + h))


class FileImages(Dataset):
    """Paths -> uint8 images; index i >= len(paths) is the horizontally flipped copy of i - len(paths)."""

    def __init__(self, paths: list, labels: list, decode: Callable):
        self.paths, self.labels, self.decode = paths, labels, decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        n = len(self.paths)
        x = self.decode(self.paths[i % n])
        return (x.flip(-1) if i >= n else x), self.labels[i % n]


def collate_images(items, with_cond: bool) -> dict:
    """[(uint8 image, label)] -> {"x": (B, C, H, W) uint8, "cond": labels or None}."""
    x = torch.stack([it[0] for it in items])  # (B, C, H, W) uint8
    cond = torch.tensor([it[1] for it in items], dtype=torch.long) if with_cond else None
    return {"x": x, "cond": cond}


def decode_images(paths: list, decode: Callable, num_workers: int = 0, batch_size: int = 256) -> torch.Tensor:
    """Decode many files once (in worker processes) into one uint8 tensor (N, C, H, W)."""
    return torch.cat([b["x"] for b in iter_files(paths, [0] * len(paths), decode, num_workers, batch_size)] or
                     [torch.zeros(0, dtype=torch.uint8)])


def iter_files(paths: list, labels: list, decode: Callable, num_workers: int = 0, batch_size: int = 256):
    """Batches {"x": uint8, "cond": labels} of decoded files in order (worker processes decode)."""
    return DataLoader(FileImages(list(paths), list(labels), decode), batch_size=batch_size, num_workers=num_workers,
                      collate_fn=partial(collate_images, with_cond=True))


class RandomFlip:
    """InMemoryBatches transform: random horizontal flip of uint8 images, seeded per batch."""

    def __init__(self, hflip: bool = False):
        self.hflip = hflip

    def __call__(self, batch: dict, seed: int) -> dict:
        u = batch["x"]
        if self.hflip:  # the seed is a function of (seed, epoch, step), so a resumed run flips the same way
            g = torch.Generator(device=u.device).manual_seed(seed)
            flip = torch.rand(u.shape[0], generator=g, device=u.device) < 0.5
            u = torch.where(flip[:, None, None, None], u.flip(-1), u)
        return {"x": u, "cond": batch["cond"]}


class ImageDataModule(L.LightningDataModule):
    """Images held in memory as one uint8 tensor; subclasses implement `load_split(split)`."""

    domain = ImageDomain()  # how samples of these data are saved, drawn and scored
    val_split = "test"  # the split that validation loops and classifier accuracy use

    def __init__(self, root: str, channels: int, image_size: int, num_classes: int = 0, batch_size: int = 128,
                 steps_per_epoch: int | None = None, hflip: bool = False, seed: int = 0, download: bool = True,
                 name: str = "images", overfit: bool = False, cache_latents: bool = False,
                 latent_cache_dir: str | None = None):
        super().__init__()
        if batch_size < 1 or (steps_per_epoch is not None and steps_per_epoch < 1):
            raise ValueError(f"batch_size={batch_size}, steps_per_epoch={steps_per_epoch}: expected >= 1")
        self.root, self.channels, self.image_size, self.num_classes = str(root), channels, image_size, num_classes
        self.batch_size, self.steps_per_epoch, self.hflip, self.seed = batch_size, steps_per_epoch, hflip, seed
        self.download, self.name, self.overfit = download, name, overfit
        self.cache_latents, self.latent_cache_dir = cache_latents, latent_cache_dir
        self.latents: dict | None = None  # attach_latents: {"posterior", "labels"} of the training split
        self.data: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.class_names: list[str] = []
        self._splits: dict[str, tuple] = {}
        self._loader = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        """(uint8 images (N, C, H, W), int64 labels (N,) or None, class names) of one split."""
        raise NotImplementedError  # abstract: each dataset reads its own files

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        data, labels, names = self.load_split("train")
        self._validate(data, names)
        self.data, self.labels = data, labels
        self.class_names = list(names) if self.num_classes else []

    def _validate(self, data: torch.Tensor, names: list[str]) -> None:
        # Model configs read ${data.channels} etc., so a mismatch must fail here, naming the key.
        c, h, w = data.shape[1:]
        if c != self.channels:
            raise ValueError(f"channels={self.channels} but {self.name} images have {c} channels")
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"image_size={self.image_size} but {self.name} images are {h}x{w}")
        if self.num_classes not in (0, len(names)):
            raise ValueError(f"num_classes={self.num_classes}: expected 0 (unconditional) or {len(names)} "
                             f"(the classes of {self.name})")

    def to_device(self, device) -> None:
        """Move the in-memory training tensor (and its batches) to the training device."""
        loader = self.train_dataloader()
        if hasattr(loader, "to"):  # streaming loaders (imagefolder) stay on the host
            loader.to(device)

    def attach_latents(self, cache: dict) -> None:
        """Train on cached posteriors (latents.py) instead of images: batches {"posterior", "cond"}."""
        self.latents, self._loader = cache, None

    def _latent_loader(self) -> InMemoryBatches:
        post, labels = self.latents["posterior"], self.latents["labels"]
        bs = min(self.batch_size, len(post))
        steps = self.steps_per_epoch or math.ceil(len(post) / bs)
        return InMemoryBatches(post, labels if self.num_classes else None, bs, steps, rank_seed(self),
                               fixed=self.overfit, transform=PickFlip(not self.overfit))

    def iter_uint8(self, split: str = "train", batch_size: int = 256):
        """(uint8 images, labels or None) of a split in stored order, in batches (latent cache building)."""
        x, y = self._split(split)
        for i in range(0, len(x), batch_size):
            yield x[i: i + batch_size], None if y is None else y[i: i + batch_size]

    def train_dataloader(self):
        if self._loader is None and self.latents is not None:
            self._loader = self._latent_loader()
        if self._loader is None:
            self.setup()
            n = len(self.data)
            bs = min(self.batch_size, n)
            steps = self.steps_per_epoch or math.ceil(n / bs)  # default: an epoch is one pass
            cond = self.labels if self.num_classes else None
            # overfit (debug=overfit): one fixed, unflipped batch, so the loss can go to ~0
            self._loader = InMemoryBatches(self.data, cond, bs, steps, rank_seed(self), fixed=self.overfit,
                                           transform=RandomFlip(self.hflip and not self.overfit))
        return self._loader

    def val_dataloader(self) -> HeldoutBatches:
        """The test split in fixed uint8 batches (the space encodes them); loaded only when validation runs
        (trainer.limit_val_batches > 0)."""
        x, y = self._split(self.val_split)
        return HeldoutBatches(x, y if self.num_classes else None, self.batch_size)

    def has_split(self, split: str) -> bool:
        return split in ("train", self.val_split)

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if split == "train":
            self.setup()
            return self.data, self.labels
        if split not in self._splits:
            self._splits[split] = self.load_split(split)[:2]
        return self._splits[split]

    def labelled(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images, labels) of a split, for classifiers (train on "train", validate on "test")."""
        x, y = self._split(split)
        if y is None:
            raise ValueError(f"{self.name}: the {split} split has no class labels (a classifier needs them)")
        return x, y

    def real_uint8(self, split: str = "train", n: int | None = None) -> torch.Tensor:
        """Real images as uint8 (N, C, H, W) (FID reference, grids); n: a seeded random subset."""
        data = self._split(split)[0]
        if n is None or n >= len(data):
            return data
        g = torch.Generator().manual_seed(self.seed)
        return data[torch.randperm(len(data), generator=g)[:n].sort().values]

    def real(self, n: int | None = None) -> torch.Tensor:
        """Real held-out images in [-1, 1] (the judge's Fréchet reference)."""
        return from_uint8(self.real_uint8(self.val_split, n))

    def describe(self) -> dict:
        self.setup()
        return {"name": self.name, "n": len(self.data), "shape": list(self.shape),
                "num_classes": self.num_classes, "root": self.root}


# ---------------------------------------------------------------- MNIST

_MNIST = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX (LeCun MNIST) uint8 array, from the raw file or its .gz."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if raw[2] != 8:
        raise ValueError(f"{path}: IDX type code {raw[2]}, expected 8 (uint8)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])  # big-endian uint32 sizes
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


class MNISTDataModule(ImageDataModule):
    """MNIST 28x28 digits (or zero-padded to 32x32), labels 0-9, read from <root>/MNIST/raw."""

    def __init__(self, root: str = "data", download: bool = True, pad_to_32: bool = False, batch_size: int = 128,
                 num_classes: int = 10, channels: int = 1, image_size: int | None = None,
                 steps_per_epoch: int | None = None, hflip: bool = False, seed: int = 0, overfit: bool = False,
                 cache_latents: bool = False, latent_cache_dir: str | None = None):
        size = 32 if pad_to_32 else 28
        if image_size is not None and image_size != size:
            raise ValueError(f"image_size={image_size}: MNIST gives {size}x{size} with pad_to_32={pad_to_32}")
        super().__init__(root, channels, size, num_classes, batch_size, steps_per_epoch, hflip, seed, download,
                         name="mnist", overfit=overfit, cache_latents=cache_latents, latent_cache_dir=latent_cache_dir)
        self.pad_to_32 = pad_to_32

    def _file(self, name: str) -> Path | None:
        raw = Path(self.root) / "MNIST" / "raw"
        return next((p for p in (raw / name, raw / f"{name}.gz") if p.is_file()), None)

    def load_split(self, split: str):
        if split not in _MNIST:
            raise ValueError(f"split={split!r}: MNIST has 'train' and 'test'")
        names = _MNIST[split]
        where = Path(self.root) / "MNIST" / "raw"

        def fetch():
            from torchvision.datasets import MNIST
            MNIST(self.root, train=split == "train", download=True)

        fetch_or_fail(lambda: all(self._file(n) for n in names), fetch, self.download,
                      f"MNIST not found under {where} ({names[0]}[.gz]); {ROOT_HINT}, "
                      "or data.download=true with internet")
        x = torch.from_numpy(read_idx(self._file(names[0])).copy())[:, None]  # (N, 1, 28, 28)
        y = torch.from_numpy(read_idx(self._file(names[1])).astype(np.int64))
        if self.pad_to_32:  # black border, the LeNet-5 convention; keeps the digit centred
            x = F.pad(x, (2, 2, 2, 2))
        return x, y, [str(i) for i in range(10)]


# ---------------------------------------------------------------- CIFAR-10

def _unpickle(path: Path) -> dict:
    """One CIFAR-10 python batch: a Python 2 pickle of a dict of bytes, lists and one uint8 array.

    Read with a restricted unpickler (numpy array globals only): plain pickle.load would run whatever a
    crafted batch file names. torchvision's CIFAR10 reads with plain pickle, hence our own reader."""
    try:
        d = restricted_pickle_load(path, encoding="bytes")  # the official files are Python 2 pickles
    except UnsafeFileError:
        raise
    except Exception as exc:  # truncated / not a pickle
        raise ConfigError(f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: not a CIFAR-10 python batch (a {type(d).__name__}, expected a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 32x32 RGB, labels 0-9, from the python-pickle layout <root>/cifar-10-batches-py."""

    FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}

    def __init__(self, root: str = "data", download: bool = True, hflip: bool = True, batch_size: int = 128,
                 num_classes: int = 10, channels: int = 3, image_size: int = 32,
                 steps_per_epoch: int | None = None, seed: int = 0, overfit: bool = False,
                 cache_latents: bool = False, latent_cache_dir: str | None = None):
        super().__init__(root, channels, image_size, num_classes, batch_size, steps_per_epoch, hflip, seed,
                         download, name="cifar10", overfit=overfit, cache_latents=cache_latents,
                         latent_cache_dir=latent_cache_dir)

    def load_split(self, split: str):
        if split not in self.FILES:
            raise ValueError(f"split={split!r}: CIFAR-10 has 'train' and 'test'")
        folder = Path(self.root) / "cifar-10-batches-py"
        files = [folder / f for f in [*self.FILES[split], "batches.meta"]]

        def fetch():
            from torchvision.datasets import CIFAR10
            CIFAR10(self.root, train=split == "train", download=True)

        fetch_or_fail(lambda: all(f.is_file() for f in files), fetch, self.download,
                      f"CIFAR-10 not found under {folder}; {ROOT_HINT}, or data.download=true with internet")
        batches = [_unpickle(f) for f in files[:-1]]
        x = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])  # (N, 3072), planes R,G,B
        y = np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in batches])
        names = [n.decode() if isinstance(n, bytes) else n for n in _unpickle(files[-1])["label_names"]]
        return torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(y), names
