"""Data domains: how samples of a kind of data are saved, drawn and scored (images: PNG grids, GIFs and
FID/KID/IS; points: scatter plots and the STATES KDE NLL protocol).

Each datamodule names its domain (`datamodule.domain`), so the tasks and callbacks call one method instead of
asking "is this images?" in eight places. Samples reach a domain decoded (the space's `decode`): [-1, 1]
pixels or data coordinates, whatever model space the diffusion ran in.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from diffusion_lab import imageio, plots
from diffusion_lab.errors import ConfigError
from diffusion_lab.metrics import class_metrics, point_metrics


class Frames:
    """Sampler callback keeping ~n_frames snapshots of `keep` samples spread over the first batch (trajectory
    strip, GIF), decoded to data as they are kept; later batches are ignored."""

    def __init__(self, steps: int, keep: int = 16, n_frames: int = 20, batch: int | None = None, decode=None):
        self.every, self.frames, self.done = max(1, steps // n_frames), [], False
        self.pick = torch.arange(0, batch, max(1, batch // keep))[:keep] if batch else slice(0, keep)
        self.decode = decode or (lambda x: x)

    def __call__(self, i: int, t: float, x: torch.Tensor) -> None:
        if self.done:
            return
        if len(self.frames) == 0 or i % self.every == 0 or t == 0:
            self.frames.append(self.decode(x[self.pick].float()).cpu())
        self.done = t == 0


class ImageDomain:
    """Images in [-1, 1]: grids, one PNG per sample, the denoising strip and GIF; FID/KID/IS vs real images."""

    def frames(self, steps: int, batch: int, decode) -> Frames:
        return Frames(steps, batch=batch, decode=decode)

    def evaluate(self, dm, samples: torch.Tensor, run_dir: Path, cfg: DictConfig, device, labels=None,
                 per_class: int | None = None, frames: list | None = None, title: str = "") -> tuple[dict, dict]:
        """Write the image outputs and score them (cfg.eval.metrics) -> (metrics, protocol entries)."""
        metrics = save_images(samples, run_dir, frames, labels, per_class)
        fid, protocol = image_fidelity(imageio.to_uint8(samples), dm, cfg, device)
        return metrics | fid, protocol

    def protocol(self, dm) -> dict:
        return {"data": dm.describe()}

    def picture(self, dm, samples: torch.Tensor, labels=None, per_class: int | None = None, title: str = "",
                path: Path | None = None) -> np.ndarray:
        """A grid of samples (one column per class when labelled) as (H, W, 3) uint8, saved to `path`."""
        grid, ncols = imageio.class_grid(samples, per_class) if labels is not None else (samples, None)
        if path is not None:
            imageio.save_grid(grid, path, nrow=ncols)
        return imageio.grid_image(grid, ncols).permute(1, 2, 0).numpy()

    def score(self, dm, samples: torch.Tensor, monitor, device) -> dict:
        """In-training FID/KID of a few samples (callbacks.MetricMonitor), reference features cached on disk."""
        from diffusion_lab.fidelity import InceptionFeatures, ReferenceCache, fidelity_metrics, reference_features

        if monitor._extractor is None:
            monitor._extractor = InceptionFeatures(monitor.weights, device)
        ref = reference_features(monitor._extractor, ReferenceCache(monitor.cache_dir), dm, monitor.reference_split,
                                 len(samples))[0]
        return fidelity_metrics(monitor._extractor(imageio.to_uint8(samples)), ref, monitor.metrics)[0]

    def judge_reference(self, dm, n: int) -> torch.Tensor | None:
        """Real held-out images in [-1, 1] for the judge's Fréchet distance."""
        return dm.real(n)

    def explore(self, dm, run_dir: Path, n: int, generator: torch.Generator) -> tuple[dict, torch.Tensor]:
        """A grid of random training images and per-channel pixel statistics -> (stats, (3, H, W) uint8)."""
        real = dm.real_uint8("train", n=n)
        imageio.save_grid(real, run_dir / "data_grid.png")
        f = real.float()
        stats = {"pixel_mean_per_channel": f.mean((0, 2, 3)).tolist(),
                 "pixel_std_per_channel": f.std((0, 2, 3)).tolist(), "grid_images": len(real)}
        return stats, imageio.grid_image(real)


class PointDomain:
    """Low-dimensional points: scatter plots / histograms; the STATES KDE NLL protocol and sample distances."""

    def frames(self, steps: int, batch: int, decode) -> None:
        return None  # the trajectory strip and GIF are image outputs

    def evaluate(self, dm, samples: torch.Tensor, run_dir: Path, cfg: DictConfig, device, labels=None,
                 per_class: int | None = None, frames: list | None = None, title: str = "") -> tuple[dict, dict]:
        return evaluate_samples(samples, dm, run_dir, title=title, labels=labels), {}

    def protocol(self, dm) -> dict:
        return {"data": dm.describe(),
                "nll": "mean -log pdf of samples under scipy.stats.gaussian_kde (Scott bandwidth) fitted on all "
                       "true points",
                "energy_distance / sliced_w1": "to held-out points (data.heldout)"}

    def picture(self, dm, samples: torch.Tensor, labels=None, per_class: int | None = None, title: str = "",
                path: Path | None = None) -> np.ndarray:
        fig = plots.render_samples(samples, dm, labels=labels, title=title)
        if path is not None:
            plots.save_figure(fig, path)
        return plots.figure_to_image(fig)

    def score(self, dm, samples: torch.Tensor, monitor, device) -> dict:
        return point_metrics(samples, dm.reference(), getattr(dm, "heldout", None))

    def judge_reference(self, dm, n: int) -> None:
        return None  # the judge's Fréchet distance is an image metric (a cheap stand-in for FID)

    def explore(self, dm, run_dir: Path, n: int, generator: torch.Generator) -> tuple[dict, torch.Tensor]:
        data = dm.reference()
        pick = data[torch.randperm(len(data), generator=generator)[:2000]]
        fig = plots.render_samples(pick, dm, title=f"{dm.name}: 2000 training points")
        plots.save_figure(fig, run_dir / "data_grid.png")
        stats = {"mean": data.mean(0).tolist(), "std": data.std(0).tolist()}
        return stats, torch.from_numpy(plots.figure_to_image(fig)).permute(2, 0, 1)


def image_fidelity(samples_u8: torch.Tensor, datamodule, cfg: DictConfig, device) -> tuple[dict, dict]:
    """cfg.eval.metrics (fid, kid, isc) of uint8 samples against the configured reference split, with the
    reference features cached on disk; -> (metrics, protocol entries)."""
    from diffusion_lab.fidelity import InceptionFeatures, ReferenceCache, fidelity_metrics, reference_features

    ev = cfg.eval
    wanted = list(ev.get("metrics") or [])  # names checked by check_eval_inputs before sampling
    if not wanted:
        return {}, {}
    fc, ref_cfg = ev.fidelity, ev.reference
    try:
        extractor = InceptionFeatures(fc.get("weights"), device, int(fc.batch_size))
    except ValueError as exc:
        raise ConfigError(f"eval.fidelity.{exc}") from exc
    n_ref = int(ref_cfg.get("n") or len(samples_u8))
    t0 = time.perf_counter()
    ref, key, hit = reference_features(extractor, ReferenceCache(fc.get("cache_dir")), datamodule, ref_cfg.split,
                                       n_ref)
    gen = extractor(samples_u8)
    values, notes = fidelity_metrics(gen, ref, wanted, int(fc.kid_subsets), int(fc.kid_subset_size))
    protocol = {"image_metrics": wanted, "n_generated_for_metrics": len(samples_u8),
                "reference": {"dataset": datamodule.name, "split": ref_cfg.split, "n": len(ref["2048"]),
                              "subset_seed": datamodule.seed, "cache_key": key, "cache_hit": hit},
                **extractor.describe(), "quantisation": "samples -> uint8 exactly as real images (to_uint8)",
                "metric_seconds": round(time.perf_counter() - t0, 2), **notes}
    return values, protocol


def save_images(samples: torch.Tensor, run_dir: Path, frames: list | None = None,
                labels: torch.Tensor | None = None, per_class: int | None = None) -> dict:
    """Image outputs: a PNG grid, one PNG per image (for external FID tools), the denoising strip and GIF."""
    if labels is None:
        imageio.save_grid(samples[:64], run_dir / "samples.png")
    else:
        grid, ncols = imageio.class_grid(samples, per_class)
        imageio.save_grid(grid, run_dir / "samples.png", nrow=ncols)
    imageio.export_pngs(samples, run_dir / "samples")
    if frames:
        strip = imageio.trajectory_strip(frames, n_rows=min(4, len(frames[0])))
        imageio.save_grid(strip[None], run_dir / "trajectory.png", nrow=1)
        imageio.save_gif([imageio.grid_image(f) for f in frames], run_dir / "sampling.gif")
    u8 = imageio.to_uint8(samples).float()
    return {"n_images": len(samples), "pixel_mean": float(u8.mean()), "pixel_std": float(u8.std())}


def evaluate_samples(samples: torch.Tensor, datamodule, run_dir: Path, title: str = "",
                     labels: torch.Tensor | None = None) -> dict:
    """Low-dimensional metrics (STATES KDE NLL protocol + bandwidth-free distances) and the sample plots.

    With class requests: `nll` etc. are those of the unconditional rows (all rows if none), and
    class_metrics adds nll/<class> (KDE on all true points), nll_own/<class> and accuracy/<class>.
    """
    reference = datamodule.reference()
    if labels is None:
        metrics = point_metrics(samples, reference, datamodule.heldout)
        plots.save_figure(plots.render_samples(samples, datamodule, title=f"{title} NLL {metrics['nll']:.3f}"),
                          run_dir / "samples.png")
        return metrics
    uncond = labels < 0
    metrics = point_metrics(samples[uncond] if uncond.any() else samples, reference, datamodule.heldout)
    names = list(datamodule.class_names)
    true_x, true_y = datamodule.labelled("all")  # the protocol's reference: every true point, held-out or not
    metrics |= class_metrics(samples, labels, true_x, true_y, names)
    cond = ~uncond
    plots.save_figure(plots.render_samples(samples[cond], datamodule, labels=labels[cond],
                                           title=f"{title}: samples by requested class"), run_dir / "samples.png")
    if datamodule.dim == 2:
        panels = {}
        if uncond.any():
            panels[f"unconditional (NLL {metrics['nll']:.3f})"] = samples[uncond]
        for c in labels[cond].unique().tolist():
            panels[f"{names[c]} (NLL {metrics[f'nll/{names[c]}']:.3f})"] = samples[labels == c]
        plots.save_figure(plots.plot_points_grid(panels, reference=reference, title=title),
                          run_dir / "samples_per_class.png")
    return metrics
