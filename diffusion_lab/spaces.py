"""Model spaces: the one map between dataset items and the tensors a diffusion model is trained on and samples.

    encode(raw batch items) -> model tensor        decode(model tensor) -> data (pixels in [-1, 1], points)

One object per run, built once in `build` (the `space` config group) and used by training, validation,
sampling and the classifiers alike, after NVlabs/edm2 `training/encoders.py`. Nets read their input shape from
the space (`${space.channels}`, `${space.image_size}`, `${space.dim}`), never from the data. Samplers work in
model space; `DiffusionModule.sample` decodes once, so grids, GIFs, FID/KID/IS, the judge and exports see data.

A space is not an nn.Module: a frozen autoencoder inside it must stay out of the diffusion model's
state_dict, optimizer and EMA. What must travel with a checkpoint (the latent scaling, the autoencoder's
sha256) is `state()` / `load_state()`, stored under checkpoint["space"].
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from diffusion_lab.errors import ConfigError


def from_uint8(u: Tensor) -> Tensor:
    """uint8 pixels -> float in [-1, 1]: x = u / 127.5 - 1."""
    return u.float() / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 pixels: round((x + 1) * 127.5), clamped to [0, 255]."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ChannelMoments:
    """Running per-channel mean and population std of (B, C, ...) tensors, summed in float64 (the latent
    scaling, measured on the fly or while the latent cache is built)."""

    def __init__(self):
        self.total = self.total_sq = 0
        self.count = 0

    def add(self, z: Tensor) -> None:
        z = z.double()
        dims = (0, *range(2, z.ndim))
        self.total, self.total_sq = self.total + z.sum(dims), self.total_sq + (z**2).sum(dims)
        self.count += z.numel() // z.shape[1]

    def result(self) -> tuple[Tensor, Tensor]:
        mean = self.total / self.count
        return mean, (self.total_sq / self.count - mean**2).clamp(min=1e-12).sqrt()


class Space:
    """Identity on model tensors; subclasses say how raw items get there and back."""

    name = "identity"  # the conf/space choice (sweep tables name the space by it)
    shape: tuple[int, ...] = ()  # model space, per item
    data_shape: tuple[int, ...] = ()  # the raw items it encodes (checked against the data before any work)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z

    def encode_batch(self, batch: dict, generator: torch.Generator | None = None) -> Tensor:
        """A training/validation batch {"x": raw items, "cond"} -> model tensor."""
        return self.encode(batch["x"], generator)

    def to(self, device) -> Space:
        return self

    def describe(self) -> dict:
        return {"space": type(self).__name__, "shape": list(self.shape)}

    def state(self) -> dict:
        """What a checkpoint must carry to decode like this run (nothing for fixed maps)."""
        return {}

    def load_state(self, state: dict, key: str = "ckpt") -> None:
        pass

    def needs_preparation(self) -> bool:
        """True while the space still has to measure something on the training data (latent scaling)."""
        return False

    def __deepcopy__(self, memo) -> Space:
        # The EMA callback deep-copies the LightningModule; a space is frozen, so every copy shares it.
        return self


class PixelSpace(Space):
    """uint8 images <-> [-1, 1] floats (DDPM's convention). Floats pass through encode unchanged (already
    model space); to_uint8(decode(encode(u))) == u exactly."""

    name = "pixels"  # its conf/space choice

    def __init__(self, channels: int, image_size: int):
        if channels < 1 or image_size < 1:
            raise ValueError(f"channels={channels}, image_size={image_size}: expected integers >= 1")
        self.channels, self.image_size = int(channels), int(image_size)
        self.shape = self.data_shape = (self.channels, self.image_size, self.image_size)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return from_uint8(x) if x.dtype == torch.uint8 else x


class PointSpace(Space):
    """Low-dimensional data: the model works on the (standardised) coordinates themselves."""

    name = "points"  # its conf/space choice

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"dim={dim}: expected an integer >= 1")
        self.dim = int(dim)
        self.shape = self.data_shape = (self.dim,)


class LatentSpace(Space):
    """A frozen KL-autoencoder's latents, standardised per channel: z_model = (z - shift) / scale, z drawn from
    the posterior N(mean, std^2) of the encoded image at every call (fresh noise per training step).

    scaling="measured": shift and scale are the per-channel mean and std of posterior samples of the training
    set, measured once (`measure`, or taken from the latent cache) and then stored in every checkpoint.
    scaling="fixed": the configured `scale_factor` (and `shift_factor`), e.g. 0.18215 for Stable Diffusion's VAE
    (z_model = (z - shift) * scale_factor, diffusers' convention).
    """

    def __init__(self, scaling: str = "measured", scale_factor: float | None = None, shift_factor: float = 0.0,
                 stats_images: int | None = 10_000, encode_batch_size: int = 256):
        if scaling not in ("measured", "fixed"):
            raise ValueError(f"scaling={scaling!r}: expected 'measured' or 'fixed'")
        if scaling == "fixed" and not scale_factor:
            raise ValueError(f"scale_factor={scale_factor}: scaling=fixed needs a scale_factor (e.g. 0.18215)")
        if stats_images is not None and stats_images < 2:
            raise ValueError(f"stats_images={stats_images}: expected null (all) or an integer >= 2")
        self.scaling, self.stats_images, self.encode_batch_size = scaling, stats_images, int(encode_batch_size)
        self.shift = self.scale = None  # (C,) tensors once known
        self.stats: dict = {}  # where shift/scale came from (protocol)
        self.images_encoded = 0  # encoder calls in images: the latent-cache test reads it
        if scaling == "fixed":
            self.shift = torch.full((self.channels,), float(shift_factor))
            self.scale = torch.full((self.channels,), 1.0 / float(scale_factor))
            self.stats = {"scaling": "fixed", "scale_factor": float(scale_factor), "shift_factor": float(shift_factor)}

    # subclasses: self.net (frozen), self.channels, self.image_size, self.shape, self.source (path), self.sha256
    def _encode_raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError  # abstract: posterior (mean, logvar) of [-1, 1] pixels

    def _decode_raw(self, z: Tensor) -> Tensor:
        raise NotImplementedError  # abstract: latents -> [-1, 1] pixels

    def to(self, device) -> LatentSpace:
        self.net.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 (or [-1, 1]) images -> posterior (mean, std) in the autoencoder's own latent units, fp32."""
        self.images_encoded += len(x)
        pixels = from_uint8(x) if x.dtype == torch.uint8 else x.float()
        out = [self._encode_raw(b.to(self.device)) for b in pixels.split(self.encode_batch_size)]
        mean = torch.cat([m for m, _ in out]).float()
        logvar = torch.cat([lv for _, lv in out]).float().clamp(-30.0, 20.0)  # LDM's clamp
        return mean, torch.exp(0.5 * logvar)

    def standardise(self, z: Tensor) -> Tensor:
        if self.scale is None:
            raise RuntimeError("latent scaling is not known yet: measure() it or load_state() a checkpoint's")
        shape = (1, -1) + (1,) * (z.ndim - 2)
        return (z - self.shift.to(z.device).view(shape)) / self.scale.to(z.device).view(shape)

    def sample_posterior(self, mean: Tensor, std: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One posterior draw, standardised: the model-space tensor of these images."""
        noise = torch.randn(mean.shape, generator=generator, device=mean.device if generator is None
                            else generator.device).to(mean.device)
        return self.standardise(mean + std * noise)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mean, std = self.posterior(x)
        return self.sample_posterior(mean, std, generator)

    def encode_batch(self, batch: dict, generator: torch.Generator | None = None) -> Tensor:
        if "posterior" in batch:  # latent-cache batches: (B, 2, C, h, w) = mean, std of the (flipped) image
            post = batch["posterior"].float()
            return self.sample_posterior(post[:, 0], post[:, 1], generator)
        return self.encode(batch["x"], generator)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Model-space latents -> [-1, 1] pixels (fp32, on z's device)."""
        shape = (1, -1) + (1,) * (z.ndim - 2)
        raw = z.float() * self.scale.to(z.device).view(shape) + self.shift.to(z.device).view(shape)
        out = [self._decode_raw(b.to(self.device)).float() for b in raw.split(self.encode_batch_size)]
        return torch.cat(out).to(z.device)

    def needs_preparation(self) -> bool:
        return self.scale is None

    def set_scaling(self, shift: Tensor, scale: Tensor, source: str) -> None:
        """Measured per-channel shift (mean) and scale (std) of posterior samples, and where they came from."""
        self.shift, self.scale = shift.float().cpu(), scale.float().cpu()
        self.stats = {"scaling": "measured", "source": source,
                      "shift": [round(v, 6) for v in self.shift.tolist()],
                      "scale": [round(v, 6) for v in self.scale.tolist()]}

    @torch.no_grad()
    def measure(self, images: Tensor, seed: int = 0) -> None:
        """Latent scaling from training images (uint8), one seeded posterior draw each: per-channel mean and
        population std over images and positions (float64 sums)."""
        g = torch.Generator().manual_seed(seed)
        moments = ChannelMoments()
        for batch in images.split(self.encode_batch_size):
            mean, std = self.posterior(batch)
            moments.add(mean + std * torch.randn(mean.shape, generator=g).to(mean.device))
        self.set_scaling(*moments.result(), f"{len(images)} training images (seed {seed}), one posterior draw each")

    def state(self) -> dict:
        return {"type": type(self).__name__, "sha256": self.sha256, "source": str(self.source),
                "shift": None if self.shift is None else self.shift.clone(),
                "scale": None if self.scale is None else self.scale.clone(), "stats": json.dumps(self.stats)}

    def load_state(self, state: dict, key: str = "ckpt") -> None:
        """The checkpoint's scaling; refuses (one line) an autoencoder whose sha256 differs from the recorded one."""
        recorded = state.get("sha256")
        if recorded != self.sha256:
            raise ConfigError(f"space: {self.source} has sha256 {self.sha256[:16]}…, but {key} was trained on the "
                              f"latents of an autoencoder with sha256 {str(recorded)[:16]}… ({state.get('source')}); "
                              "decoding with another autoencoder would give wrong images")
        if state.get("scale") is not None:
            self.shift, self.scale = state["shift"].float(), state["scale"].float()
            self.stats = json.loads(state.get("stats") or "{}")

    def describe(self) -> dict:
        return {"space": type(self).__name__, "shape": list(self.shape), "autoencoder": str(self.source),
                "autoencoder_sha256": self.sha256, "latent_scaling": self.stats}


class AutoencoderSpace(LatentSpace):
    """Latents of the suite's own KL-autoencoder (a task=train_autoencoder checkpoint)."""

    name = "autoencoder"  # its conf/space choice

    def __init__(self, ckpt: str, channels: int | None = None, image_size: int | None = None, **kwargs):
        from diffusion_lab.autoencoder import load_autoencoder  # the autoencoder task imports the build layer

        if not ckpt:
            raise ValueError("ckpt=null: space=autoencoder needs space.ckpt=<a task=train_autoencoder last.ckpt>")
        self.net, info = load_autoencoder(ckpt, key="space.ckpt")
        self.source, self.sha256 = str(ckpt), info["sha256"]
        self.channels = int(self.net.z_channels)
        self.image_size = int(self.net.latent_shape[-1])
        self.shape = tuple(int(s) for s in self.net.latent_shape)
        self.data_shape = (int(self.net.in_channels), int(self.net.image_size), int(self.net.image_size))
        for key, want, have in (("channels", channels, self.channels), ("image_size", image_size, self.image_size)):
            if want is not None and int(want) != have:
                what = "z channels" if key == "channels" else "latent size"
                raise ValueError(f"{key}={want}: the autoencoder {ckpt} has {have} ({what})")
        super().__init__(**kwargs)

    def _encode_raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.net.encode(x)

    def _decode_raw(self, z: Tensor) -> Tensor:
        return self.net.decode(z)


def folder_sha256(folder: Path) -> str:
    """sha256 over a diffusers model folder: config.json and every weights file, by name, in sorted order."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.suffix in (".json", ".safetensors", ".bin")):
        h.update(f.name.encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


class DiffusersVAESpace(LatentSpace):
    """Latents of a local diffusers `AutoencoderKL` folder (config.json + safetensors). diffusers is the optional
    extra `pip install diffusion-lab[diffusers]`, imported only here. Its input resolution is the data's."""

    name = "diffusers_vae"  # its conf/space choice

    def __init__(self, path: str, pixel_size: int, channels: int | None = None, image_size: int | None = None,
                 **kwargs):
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise ValueError(f"path={path}: not a diffusers AutoencoderKL folder (no config.json)")
        try:
            from diffusers import AutoencoderKL
        except ImportError as exc:
            raise ConfigError("space=diffusers_vae needs the optional extra diffusers: "
                              "pip install 'diffusion-lab[diffusers]' (or pip install diffusers)") from exc
        self.net = AutoencoderKL.from_pretrained(str(folder), local_files_only=True).eval().requires_grad_(False)
        self.source, self.sha256 = str(folder), folder_sha256(folder)
        factor = 2 ** (len(self.net.config.block_out_channels) - 1)
        if pixel_size % factor:
            raise ValueError(f"pixel_size={pixel_size}: must be divisible by the VAE's downsampling factor {factor}")
        self.channels, self.image_size = int(self.net.config.latent_channels), pixel_size // factor
        self.shape = (self.channels, self.image_size, self.image_size)
        self.data_shape = (int(self.net.config.in_channels), pixel_size, pixel_size)
        super().__init__(**kwargs)

    def _encode_raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dist = self.net.encode(x).latent_dist
        return dist.mean, dist.logvar

    def _decode_raw(self, z: Tensor) -> Tensor:
        return self.net.decode(z).sample


def space_name(class_name: str) -> str:
    """The conf/space choice of a Space class recorded in a protocol ("PixelSpace" -> "pixels"); other names as
    they are (a user's own space)."""
    cls = globals().get(class_name)
    return cls.name if isinstance(cls, type) and issubclass(cls, Space) else class_name


@lru_cache(maxsize=16)
def _latent_shape(path: str, mtime_ns: int, size: int) -> tuple[int, int, int]:
    from diffusion_lab.build import load_checkpoint  # the build layer sits above the spaces

    ckpt = load_checkpoint(path, key="space.ckpt")
    node = ckpt["config"].get("autoencoder")
    if not isinstance(node, dict) or "z_channels" not in node:
        raise ConfigError(f"space.ckpt={path}: not a task=train_autoencoder checkpoint (no autoencoder config)")
    factor = 2 ** (len(node["ch_mult"]) - 1)
    return int(node["z_channels"]), int(node["image_size"]) // factor, int(node["image_size"]) // factor


def latent_shape(source: str, index: int, pixel_size: int | None = None) -> int:
    """The `dl_latent_shape` resolver: entry `index` of [z, h, w] of an autoencoder, read from a suite checkpoint's
    stored config (cached per file version) or a diffusers folder's config.json at `pixel_size`, so nets can
    say `in_channels: ${space.channels}` whatever the space."""
    path = Path(str(source))
    if (path / "config.json").is_file():  # diffusers AutoencoderKL folder
        conf = json.loads((path / "config.json").read_text())
        factor = 2 ** (len(conf["block_out_channels"]) - 1)
        size = int(pixel_size or conf.get("sample_size", 0)) // factor
        return [int(conf["latent_channels"]), size, size][int(index)]
    if not path.is_file():
        raise ConfigError(f"space: {source}: not found (expected a task=train_autoencoder last.ckpt or a diffusers "
                          "AutoencoderKL folder)")
    st = os.stat(path)
    return _latent_shape(str(path), st.st_mtime_ns, st.st_size)[int(index)]


__all__ = ["AutoencoderSpace", "DiffusersVAESpace", "LatentSpace", "PixelSpace", "PointSpace", "Space",
           "file_sha256", "from_uint8", "latent_shape", "space_name", "to_uint8"]
