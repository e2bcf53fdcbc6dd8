"""Evaluation of generated samples: point metrics and plots, image grids and FID/KID/IS, the class judge.

`tasks.generate_and_evaluate` draws the samples; everything that scores or draws them lives here.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_lab import imageio, plots
from diffusion_lab.build import ConfigError
from diffusion_lab.classifier import load_classifier
from diffusion_lab.fidelity import METRICS, InceptionFeatures, ReferenceCache, fidelity_metrics, reference_features
from diffusion_lab.metrics import class_metrics, point_metrics


def check_eval_inputs(ev: DictConfig) -> None:
    """eval.metrics names, the Inception weights file and the judge checkpoint, checked up front."""
    wanted = list(ev.get("metrics") or [])
    bad = [m for m in wanted if m not in METRICS]
    if bad:
        raise ConfigError(f"eval.metrics={wanted}: unknown {bad}; expected a subset of {list(METRICS)}")
    weights = OmegaConf.select(ev, "fidelity.weights")
    if wanted and weights and not Path(weights).is_file():
        raise ConfigError(f"eval.fidelity.weights={weights}: file not found (expected Inception weights for "
                          "torch-fidelity, or null to download them)")
    if ev.get("judge"):
        if ev.get("classes") is None:
            raise ConfigError(f"eval.judge={ev.judge}: judging needs class requests (eval.classes=all or a list)")
        load_classifier(ev.judge, key="eval.judge")  # a classifier checkpoint, with an allow-listed config


def image_fidelity(samples_u8: torch.Tensor, datamodule, cfg: DictConfig, device) -> tuple[dict, dict]:
    """cfg.eval.metrics (fid, kid, isc) of uint8 samples against the configured reference split, with the
    reference features cached on disk; -> (metrics, protocol entries)."""
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


def judge_metrics(samples: torch.Tensor, labels: torch.Tensor | None, judge: str, names: list[str],
                  datamodule=None) -> tuple[dict, dict]:
    """A clean classifier checkpoint (eval.judge) on the class-requested samples: accuracy per class and,
    with image data, the Fréchet distance between its features of the samples and of as many real
    test images (a cheap CPU stand-in for FID on MNIST)."""
    if labels is None or not bool((labels >= 0).any()):
        raise ConfigError(f"eval.judge={judge}: judging needs class requests (eval.classes=all or a list)")
    net, info = load_classifier(judge, key="eval.judge")
    keep = labels >= 0
    x, want = samples[keep], labels[keep]

    @torch.no_grad()
    def features(batch):
        return torch.cat([net.features(b, torch.zeros(len(b))) for b in batch.split(1024)])

    f_gen = features(x)
    pred = net.head(f_gen).argmax(1)
    out = {"judge_accuracy": float((pred == want).float().mean())}
    for c in want.unique().tolist():
        out[f"judge_accuracy/{names[c] if c < len(names) else c}"] = float((pred[want == c] == c).float().mean())
    protocol = {"judge": str(judge), "judge_step": info["step"]}
    if getattr(datamodule, "kind", "points") == "images":
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

        real = datamodule.from_uint8(datamodule.real_uint8("test", len(x)))
        stats = [fid_features_to_statistics(f.float()) for f in (f_gen, features(real))]
        out["judge_fd"] = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
        protocol["judge_fd"] = (f"Fréchet distance of the judge's penultimate features: {len(x)} samples vs "
                                f"{len(real)} real test images")
    return out, protocol


def evaluate_images(samples: torch.Tensor, run_dir: Path, frames: list | None = None,
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


def metric_protocol(datamodule) -> dict:
    if getattr(datamodule, "kind", "points") == "images":
        return {"data": datamodule.describe()}
    return {"data": datamodule.describe(),
            "nll": "mean -log pdf of samples under scipy.stats.gaussian_kde (Scott bandwidth) fitted on all "
                   "true points",
            "energy_distance / sliced_w1": "to held-out points (data.heldout)"}
