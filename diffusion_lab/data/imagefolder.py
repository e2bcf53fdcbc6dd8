"""Class-per-folder image trees (ImageNet-100 and the like): streamed with PIL decoding in DataLoader workers.

Too big to preload (ImageNet-100 at 128px is ~6 GB of uint8), so by default files are decoded per item in
workers; `preload=True` decodes once into a uint8 tensor and batches like the in-memory modules.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from diffusion_lab.data.images import (
    ROOT_HINT,
    FileImages,
    ImageDataModule,
    collate_images,
    decode_images,
    iter_files,
    load_image,
)


class _FlipSampler(Sampler):
    """Seeded permutation of n items per epoch; index i + n asks `FileImages` for the flipped copy of item i.

    `fixed_batch`: repeat the first `fixed_batch` indices of epoch 0, unflipped (debug=overfit)."""

    def __init__(self, n: int, hflip: bool, seed: int, fixed_batch: int = 0):
        self.n, self.hflip, self.seed, self.epoch, self.fixed_batch = n, hflip, seed, 0, fixed_batch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        perm = torch.randperm(self.n, generator=g)
        if self.fixed_batch:
            first = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003))
            yield from first[: self.fixed_batch].repeat(self.n // self.fixed_batch).tolist()
            return
        flip = torch.rand(self.n, generator=g) < 0.5 if self.hflip else torch.zeros(self.n, dtype=torch.bool)
        yield from (perm + self.n * flip.long()).tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])


class ImageFolderDataModule(ImageDataModule):
    """Any <root>/<class>/<image> tree (or <root>/<split>/<class>/...); labels from sorted folder names."""

    def __init__(self, root: str = "data/imagefolder", image_size: int = 128, center_crop: bool = True,
                 channels: int = 3, num_classes: int = 0, batch_size: int = 64, num_workers: int = 4,
                 hflip: bool = True, preload: bool = False, steps_per_epoch: int | None = None, seed: int = 0,
                 name: str = "imagefolder", overfit: bool = False, cache_latents: bool = False,
                 latent_cache_dir: str | None = None, val_split: str = "test"):
        if steps_per_epoch is not None and not preload:
            raise ValueError(f"steps_per_epoch={steps_per_epoch}: only with preload=true (streaming: one pass)")
        super().__init__(root, channels, image_size, num_classes, batch_size, steps_per_epoch, hflip, seed,
                         download=False, name=name, overfit=overfit, cache_latents=cache_latents,
                         latent_cache_dir=latent_cache_dir)
        self.center_crop, self.num_workers, self.preload = center_crop, num_workers, preload
        self.val_split = val_split  # the held-out folder: ImageNet trees name it val/ or validation/, not test/
        self.samples: list[tuple[str, int]] = []

    def _decode(self):
        return partial(load_image, image_size=self.image_size, channels=self.channels, center_crop=self.center_crop)

    def _scan(self, split: str) -> tuple[list[tuple[str, int]], list[str]]:
        """(path, label) pairs and class names of a split: <root>/<split> if it exists, else <root> for train."""
        base = Path(self.root) / split
        if not base.is_dir() and split == "train":
            base = Path(self.root)
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
        try:
            classes, index = find_classes(str(base))
            samples = make_dataset(str(base), index, extensions=IMG_EXTENSIONS)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise FileNotFoundError(f"no class-per-folder images under {base}; {ROOT_HINT} "
                                    f"(<root>/<class>/<image> or <root>/{split}/<class>/<image>)") from exc
        return samples, classes

    def has_split(self, split: str) -> bool:
        return split == "train" or (split == self.val_split and (Path(self.root) / split).is_dir())

    def load_split(self, split: str):
        samples, classes = self._scan(split)
        x = decode_images([p for p, _ in samples], self._decode(), self.num_workers)
        return x, torch.tensor([y for _, y in samples], dtype=torch.long), classes

    def setup(self, stage: str | None = None) -> None:
        if self.preload:
            return super().setup(stage)
        if self.samples:
            return
        self.samples, classes = self._scan("train")
        probe = self._decode()(self.samples[0][0])[None]  # one decode checks channels / image_size early
        self._validate(probe, classes)
        self.class_names = list(classes) if self.num_classes else []

    def train_dataloader(self):
        if self.preload or self.latents is not None:
            return super().train_dataloader()
        if self._loader is None:
            self.setup()
            paths, labels = [p for p, _ in self.samples], [y for _, y in self.samples]
            bs = min(self.batch_size, len(paths))
            self._loader = DataLoader(
                FileImages(paths, labels, self._decode()), batch_size=bs,
                sampler=_FlipSampler(len(paths), self.hflip, self.seed, bs if self.overfit else 0),
                num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                pin_memory=torch.cuda.is_available(), drop_last=True,
                collate_fn=partial(collate_images, with_cond=bool(self.num_classes)))
        return self._loader

    def iter_uint8(self, split: str = "train", batch_size: int = 256):
        """(uint8 images, labels) of a split in stored order, decoded by workers batch by batch (streaming)."""
        if self.preload:
            yield from super().iter_uint8(split, batch_size)
            return
        samples, _ = self._scan(split)
        for b in iter_files([p for p, _ in samples], [y for _, y in samples], self._decode(), self.num_workers,
                            batch_size):
            yield b["x"], b["cond"]

    def real_uint8(self, split: str = "train", n: int | None = None) -> torch.Tensor:
        """Real images as uint8 (N, C, H, W); n: a seeded random subset, decoded on demand when streaming."""
        if self.preload:
            return super().real_uint8(split, n)
        samples, _ = self._scan(split)
        if n is not None and n < len(samples):
            pick = torch.randperm(len(samples), generator=torch.Generator().manual_seed(self.seed))[:n]
            samples = [samples[i] for i in pick.sort().values.tolist()]
        return decode_images([p for p, _ in samples], self._decode(), self.num_workers)

    def describe(self) -> dict:
        self.setup()
        n = len(self.data) if self.preload else len(self.samples)
        return {"name": self.name, "n": n, "shape": list(self.shape), "num_classes": self.num_classes,
                "root": self.root, "preload": self.preload}
