"""Latent cache (data.cache_latents=true): a dataset encoded once by a frozen autoencoder, EDM2-style.

For every training image, and for its horizontal flip when the data flip, the cache stores the posterior
mean and std, not one latent: every training step then draws a fresh posterior sample and a random flip, as
on-the-fly encoding would (given the same flip and noise the two are equal; tests/test_spaces.py checks it).
The file is keyed by everything that changes the latents: dataset identity, split, resolution, the
autoencoder's sha256 and the flip, so a second run with the same key reads it and encodes nothing. The per-
channel latent scaling is measured from the cached posteriors while they are built and stored with them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import Tensor

from diffusion_lab.errors import ConfigError
from diffusion_lab.fileio import atomic_path
from diffusion_lab.spaces import ChannelMoments

log = logging.getLogger("diffusion_lab")
FORMAT = 1  # bump when the file layout changes: old files then miss instead of misreading


def cache_key(datamodule, space, split: str = "train") -> tuple[str, dict]:
    """(hex key, the fields it hashes): dataset, split, resolution, autoencoder sha256, flip."""
    fields = {"format": FORMAT, "dataset": datamodule.describe(), "split": split,
              "resolution": list(datamodule.shape), "autoencoder_sha256": space.sha256,
              "flip": bool(datamodule.hflip)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24], fields


@torch.no_grad()
def build_cache(datamodule, space, split: str = "train", seed: int = 0) -> dict:
    """Encode every image of `split` (and its flip): {"posterior": (N, F, 2, C, h, w) float32 mean/std, "labels",
    and the measured per-channel shift/scale of one posterior draw per stored posterior (flips included)}."""
    parts, labels = [], []
    g = torch.Generator().manual_seed(seed)
    moments = ChannelMoments()
    for u8, y in datamodule.iter_uint8(split):
        views = [u8, u8.flip(-1)] if datamodule.hflip else [u8]
        post = []
        for view in views:
            mean, std = space.posterior(view)
            moments.add(mean + std * torch.randn(mean.shape, generator=g).to(mean.device))
            post.append(torch.stack([mean, std], 1).cpu())  # (B, 2, C, h, w)
        parts.append(torch.stack(post, 1))  # (B, F, 2, C, h, w)
        if y is not None:
            labels.append(y)
    shift, scale = moments.result()
    return {"posterior": torch.cat(parts), "labels": torch.cat(labels) if labels else None,
            "shift": shift.float(), "scale": scale.float()}


def load_or_build(datamodule, space, cache_dir: str | Path, split: str = "train", seed: int = 0) -> tuple[dict, dict]:
    """The cache of (datamodule, space, split): read when its key exists, else built and written atomically.
    -> (cache, protocol entries: key, path, hit)."""
    key, fields = cache_key(datamodule, space, split)
    path = Path(cache_dir) / f"{datamodule.name}_{split}_{key}.pt"
    hit = path.is_file()
    if hit:
        try:
            cache = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors only: data, never code
        except Exception as exc:
            raise ConfigError(f"data.latent_cache_dir: {path} cannot be read ({type(exc).__name__}); delete it to "
                              "rebuild the cache") from exc
        if cache.get("fields") != json.dumps(fields, sort_keys=True, default=str):
            raise ConfigError(f"data.latent_cache_dir: {path} does not hold the latents its name says (key fields "
                              "differ); delete it to rebuild the cache")
    else:
        log.info("encoding the %s split of %s once into the latent cache %s", split, datamodule.name, path)
        cache = build_cache(datamodule, space, split, seed)
        cache["fields"] = json.dumps(fields, sort_keys=True, default=str)
        with atomic_path(path) as tmp:  # concurrent builders of one key write the same bytes; the last rename wins
            torch.save(cache, tmp)
    protocol = {"latent_cache": {"key": key, "path": str(path), "hit": hit, "n": len(cache["posterior"]),
                                 "flips": int(cache["posterior"].shape[1])}}
    return cache, protocol


class PickFlip:
    """InMemoryBatches transform over cached posteriors (B, F, 2, C, h, w): a random flip per image (seeded per
    batch like the pixel path's flip) -> {"posterior": (B, 2, C, h, w), "cond"}; the space draws the sample."""

    def __init__(self, random: bool = True):
        self.random = random

    def __call__(self, batch: dict, seed: int) -> dict:
        post: Tensor = batch["x"]
        if post.shape[1] == 1 or not self.random:
            return {"posterior": post[:, 0], "cond": batch["cond"]}
        g = torch.Generator(device=post.device).manual_seed(seed)
        flip = (torch.rand(post.shape[0], generator=g, device=post.device) < 0.5).long()
        return {"posterior": post[torch.arange(len(post), device=post.device), flip], "cond": batch["cond"]}
