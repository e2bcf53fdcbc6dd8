"""Image outputs: grids, per-image PNG folders, GIFs and trajectory strips (torchvision + PIL)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from diffusion_lab.fileio import atomic_path
from diffusion_lab.spaces import to_uint8  # the pixel space owns the [-1, 1] <-> uint8 mapping


def grid_image(x: Tensor, nrow: int | None = None) -> Tensor:
    """(N, C, H, W) in [-1, 1] or uint8 -> one uint8 grid (3, H', W')."""
    u8 = x if x.dtype == torch.uint8 else to_uint8(x)
    nrow = nrow or max(1, int(round(len(u8) ** 0.5)))
    return make_grid(u8.cpu(), nrow=nrow, padding=2, pad_value=255)


def _pil(grid: Tensor) -> Image.Image:
    arr = grid.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def _atomic(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def save_grid(x: Tensor, path: Path, nrow: int | None = None) -> None:
    """Write a PNG grid of images atomically."""
    img = _pil(grid_image(x, nrow))
    _atomic(Path(path), lambda tmp: img.save(tmp, format="PNG"))


def save_gif(frames: list[Tensor], path: Path, duration_ms: int = 80) -> None:
    """Animated GIF from uint8 grids (3, H, W); the last frame is held longer."""
    imgs = [_pil(f) for f in frames]
    durations = [duration_ms] * (len(imgs) - 1) + [1000]
    _atomic(Path(path), lambda tmp: imgs[0].save(tmp, format="GIF", save_all=True, append_images=imgs[1:],
                                                 duration=durations, loop=0))


def export_pngs(x: Tensor, directory: Path) -> int:
    """One PNG per image (what torch-fidelity's `fidelity --input1 DIR` and other FID tools read)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    u8 = (x if x.dtype == torch.uint8 else to_uint8(x)).cpu()
    for i, img in enumerate(u8):
        _pil(img).save(directory / f"{i:06d}.png")
    return len(u8)


def trajectory_strip(frames: list[Tensor], n_rows: int = 4) -> Tensor:
    """Rows = samples, columns = reverse-process snapshots: a (3, H', W') uint8 strip."""
    cols = [to_uint8(f[:n_rows]) for f in frames]  # each (n_rows, C, H, W)
    stacked = torch.stack(cols, dim=1).flatten(0, 1)  # row-major: sample i, all times
    return make_grid(stacked.cpu(), nrow=len(frames), padding=2, pad_value=255)


def class_grid(samples: Tensor, per_class: int, rows: int = 8) -> tuple[Tensor, int]:
    """Samples stored group by group (per_class each) -> one column per group, up to `rows` rows."""
    groups = len(samples) // per_class
    x = samples[: groups * per_class].reshape(groups, per_class, *samples.shape[1:])[:, : min(per_class, rows)]
    return x.transpose(0, 1).reshape(-1, *samples.shape[1:]), groups
