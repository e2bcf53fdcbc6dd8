"""CelebA-64 (CMU 10-799 subset): faces without the Blurry, Eyeglasses, Heavy_Makeup, Wearing_Hat attributes.

Two sources, one result (uint8 (N, 3, 64, 64) in memory + the kept attributes as labels-for-reference):
- layout="export": the course export <root>/<export_dir>/<split>/images/*.png with <split>/attributes.csv
  (column image_id, e.g. 000002.png, then the 40 CelebA attributes as 0/1 or -1/1);
- layout="torchvision": full CelebA as torchvision lays it out, <root>/celeba/img_align_celeba/*.jpg,
  list_attr_celeba.txt, list_eval_partition.txt; images with an excluded attribute are dropped, the
  178x218 faces are centre-cropped to `crop` (140, as in DDPM/DDIM's CelebA-64) and resized to 64.
Decoding ~160k JPEGs takes minutes, so the processed tensor is cached once per setting in
<cache_dir or root>/celeba64_cache_<hash>.pt. All of train CelebA at 64x64 is ~2 GB of uint8 in RAM.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import warnings
from functools import partial
from pathlib import Path

import torch

from diffusion_lab.data.images import ROOT_HINT, ImageDataModule, decode_images, fetch_or_fail, load_image
from diffusion_lab.fileio import atomic_path

EXCLUDED = ("Blurry", "Eyeglasses", "Heavy_Makeup", "Wearing_Hat")
_TV_SPLITS = {"train": 0, "valid": 1, "test": 2, "all": None}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class CelebA64DataModule(ImageDataModule):
    """CelebA-64 subset, unconditional (cond None); `attributes` (N, A) holds the kept 0/1 attributes."""

    def __init__(self, root: str = "data", layout: str = "export", hflip: bool = True,
                 exclude_attributes: tuple[str, ...] | list[str] = EXCLUDED, image_size: int = 64, crop: int = 140,
                 export_dir: str = "celeba-subset", channels: int = 3, num_classes: int = 0, batch_size: int = 128,
                 steps_per_epoch: int | None = None, seed: int = 0, download: bool = True, cache: bool = True,
                 cache_dir: str | None = None, num_workers: int = 0, overfit: bool = False,
                 cache_latents: bool = False, latent_cache_dir: str | None = None):
        if layout not in ("export", "torchvision"):
            raise ValueError(f"layout={layout!r}: expected 'export' or 'torchvision'")
        if num_classes != 0:
            raise ValueError(f"num_classes={num_classes}: CelebA-64 is unconditional, expected 0")
        super().__init__(root, channels, image_size, num_classes, batch_size, steps_per_epoch, hflip, seed,
                         download, name="celeba64", overfit=overfit, cache_latents=cache_latents,
                         latent_cache_dir=latent_cache_dir)
        self.layout, self.exclude, self.crop = layout, tuple(exclude_attributes or ()), crop
        self.export_dir, self.cache, self.cache_dir, self.num_workers = export_dir, cache, cache_dir, num_workers
        self.attributes: torch.Tensor | None = None
        self.attribute_names: list[str] = []
        self.files: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        item = self._processed("train")
        self._validate(item["x"], [])
        self.data, self.labels = item["x"], None
        self.attributes, self.attribute_names, self.files = item["attr"], item["attr_names"], item["files"]

    def load_split(self, split: str):
        return self._processed(split)["x"], None, []

    def describe(self) -> dict:
        return {**super().describe(), "layout": self.layout, "excluded": list(self.exclude),
                "attributes": len(self.attribute_names)}

    # ------------------------------------------------------------ listing (cheap) -> decoding (cached)

    def _processed(self, split: str) -> dict:
        paths, attr, names, fingerprint = self._list(split)
        keep = [i for i, n in enumerate(names) if n not in self.exclude]
        if attr is not None:
            hit = [i for i, n in enumerate(names) if n in self.exclude]
            rows = (attr[:, hit] == 0).all(1) if hit else torch.ones(len(paths), dtype=torch.bool)
            paths = [p for p, k in zip(paths, rows.tolist()) if k]
            attr = attr[rows][:, keep]
        if not paths:
            raise ValueError(f"exclude_attributes={list(self.exclude)}: no CelebA {split} images left under "
                             f"{self.root}")
        settings = {"layout": self.layout, "split": split, "exclude": sorted(self.exclude), "crop": self.crop,
                    "image_size": self.image_size, "channels": self.channels, "n": len(paths), "src": fingerprint}
        key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        cache = Path(self.cache_dir or self.root) / f"celeba64_cache_{key}.pt"
        if self.cache and cache.is_file():
            return torch.load(cache, weights_only=True)
        crop = self.crop if self.layout == "torchvision" else None  # the export is already 64x64 faces
        decode = partial(load_image, image_size=self.image_size, channels=self.channels, crop=crop)
        item = {"x": decode_images(paths, decode, self.num_workers), "files": [Path(p).name for p in paths],
                "attr": attr, "attr_names": [names[i] for i in keep] if attr is not None else []}
        if self.cache:
            _save(item, cache)
        return item

    def _list(self, split: str):
        """(image paths, 0/1 attributes (N, 40) or None, attribute names, source fingerprint) of a split."""
        return self._list_export(split) if self.layout == "export" else self._list_torchvision(split)

    def _list_export(self, split: str):
        # The course's default root is ./data/celeba-subset; accept the subset folder itself as root too.
        base = next((b for b in (Path(self.root) / self.export_dir, Path(self.root))
                     if (b / split / "images").is_dir()), Path(self.root) / self.export_dir)
        images, table = base / split / "images", base / split / "attributes.csv"
        fetch_or_fail(images.is_dir, None, False,
                      f"CelebA-64 export not found under {images}; {ROOT_HINT} (the folder holding "
                      f"{self.export_dir}/{split}/images), or use layout=torchvision with full CelebA")
        files = {p.stem: p for p in images.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES}
        if not table.is_file():  # images only: no attributes to filter or report
            return [str(files[k]) for k in sorted(files)], None, [], [len(files)]
        with open(table, newline="") as f:
            header, *rows = list(csv.reader(f))
        ids = [Path(r[0]).stem for r in rows]
        missing = sum(i not in files for i in ids)
        if missing:
            warnings.warn(f"{table}: {missing} of {len(ids)} listed images are not in {images}; skipped",
                          stacklevel=2)
        rows = [r for r, i in zip(rows, ids) if i in files]
        attr = torch.tensor([[float(v) > 0 for v in r[1:]] for r in rows], dtype=torch.uint8).reshape(-1,
                                                                                                     len(header) - 1)
        st = table.stat()
        return [str(files[Path(r[0]).stem]) for r in rows], attr, header[1:], [len(rows), st.st_size, st.st_mtime]

    def _list_torchvision(self, split: str):
        if split not in _TV_SPLITS:
            raise ValueError(f"split={split!r}: CelebA has {', '.join(_TV_SPLITS)}")
        base = Path(self.root) / "celeba"
        need = [base / "img_align_celeba", base / "list_attr_celeba.txt", base / "list_eval_partition.txt"]

        def fetch():  # Google Drive (needs gdown, often over quota); verifies md5
            from torchvision.datasets import CelebA
            CelebA(self.root, split="train", target_type="attr", download=True)

        fetch_or_fail(lambda: all(p.exists() for p in need), fetch, self.download,
                      f"CelebA not found under {base} (img_align_celeba/, list_attr_celeba.txt, "
                      f"list_eval_partition.txt); {ROOT_HINT}, or data.download=true with internet and gdown")
        part = dict(line.split() for line in need[2].read_text().splitlines() if line.strip())
        lines = need[1].read_text().splitlines()  # count, 40 names, then "000001.jpg -1 1 ..."
        names = lines[1].split()
        unknown = [a for a in self.exclude if a not in names]
        if unknown:
            raise ValueError(f"exclude_attributes={list(self.exclude)}: unknown CelebA attribute(s) {unknown}")
        want = _TV_SPLITS[split]
        rows = [ln.split() for ln in lines[2:] if ln.strip()]
        rows = [r for r in rows if want is None or int(part[r[0]]) == want]
        attr = torch.tensor([[int(v) > 0 for v in r[1:]] for r in rows], dtype=torch.uint8).reshape(-1, len(names))
        fingerprint = [len(rows), *(os.stat(p).st_size for p in need[1:])]
        return [str(need[0] / r[0]) for r in rows], attr, names, fingerprint


def _save(item: dict, path: Path) -> None:
    # Write-then-rename so an interrupted build never leaves a truncated cache that later loads.
    try:
        with atomic_path(path) as tmp:
            torch.save(item, tmp)
    except OSError as exc:  # read-only data root: keep going from memory, rebuild next time
        warnings.warn(f"could not write the CelebA-64 cache {path} ({exc}); set data.cache_dir", stacklevel=3)
