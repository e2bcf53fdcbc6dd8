"""Tasks (task=train|sample|evaluate): each writes results.json = {"metrics", "protocol"} in its run dir."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_lab import imageio, plots
from diffusion_lab.build import ConfigError, build, build_trainer, check_sampler, load_checkpoint, make, module_state
from diffusion_lab.callbacks import EMA
from diffusion_lab.metrics import point_metrics
from diffusion_lab.samplers import nfe


def write_json(path: Path, obj: dict) -> None:
    """Atomic JSON write (temp file + rename): a crash never leaves a truncated results.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2, default=str)
    os.replace(tmp, path)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sampler_protocol(sampler, module) -> dict:
    fn = getattr(sampler, "func", sampler)
    kw = dict(getattr(sampler, "keywords", {}))
    return {"sampler": fn.__name__.removeprefix("sample_"), **kw, "nfe": nfe(sampler, kw.get("steps", 0)),
            "objective": module.objective.describe(), "schedule": module.objective.schedule.describe()}


class _Frames:
    """Sampler callback keeping ~n_frames snapshots of the first `keep` samples (trajectory strip, GIF)."""

    def __init__(self, steps: int, keep: int = 16, n_frames: int = 20):
        self.every, self.keep, self.frames = max(1, steps // n_frames), keep, []

    def __call__(self, i: int, t: float, x: torch.Tensor) -> None:
        if len(self.frames) == 0 or i % self.every == 0 or t == 0:
            self.frames.append(x[: self.keep].float().cpu())


def generate_and_evaluate(module, datamodule, cfg: DictConfig, run_dir: Path, protocol: dict,
                          sampler=None, wall_start: float | None = None) -> dict:
    """Draw cfg.eval.n_samples with a seeded generator, save them, compute metrics and plots, write results."""
    ev = cfg.eval
    sampler = sampler or module.sampler
    images = getattr(datamodule, "kind", "points") == "images"
    frames = _Frames(dict(getattr(sampler, "keywords", {})).get("steps", 1)) if images else None
    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(int(ev.seed))
    samples = module.sample(int(ev.n_samples), generator=generator, sampler=sampler,
                            batch_size=ev.get("batch_size"), callback=frames).float().cpu()
    sample_time = time.perf_counter() - t0
    torch.save({"samples": samples}, run_dir / "samples.pt")
    np.savez(run_dir / "samples.npz", samples=samples.numpy())
    if images:
        metrics = evaluate_images(samples, run_dir, frames.frames if frames else None)
    else:
        metrics = evaluate_samples(samples, datamodule, run_dir, title=protocol.get("title", ""))
    protocol = {**protocol, **_sampler_protocol(sampler, module), "n_samples": int(ev.n_samples),
                "sample_seed": int(ev.seed), "sampling_seconds": round(sample_time, 3),
                "device": _device_name(module.device)}
    if wall_start is not None:
        protocol["wall_seconds"] = round(time.perf_counter() - wall_start, 2)
    results = {"metrics": metrics, "protocol": protocol}
    write_json(run_dir / "results.json", results)
    return results


def evaluate_images(samples: torch.Tensor, run_dir: Path, frames: list | None = None) -> dict:
    """Image outputs: a PNG grid, one PNG per image (for external FID tools), the denoising strip and GIF."""
    imageio.save_grid(samples[:64], run_dir / "samples.png")
    imageio.export_pngs(samples, run_dir / "samples")
    if frames:
        strip = imageio.trajectory_strip(frames, n_rows=min(4, len(frames[0])))
        imageio.save_grid(strip[None], run_dir / "trajectory.png", nrow=1)
        imageio.save_gif([imageio.grid_image(f) for f in frames], run_dir / "sampling.gif")
    u8 = imageio.to_uint8(samples).float()
    return {"n_images": len(samples), "pixel_mean": float(u8.mean()), "pixel_std": float(u8.std())}


def evaluate_samples(samples: torch.Tensor, datamodule, run_dir: Path, title: str = "") -> dict:
    """Low-dimensional metrics (STATES KDE NLL protocol + bandwidth-free distances) and the sample plot."""
    metrics = point_metrics(samples, datamodule.reference(), datamodule.heldout)
    plots.save_figure(plots.render_samples(samples, datamodule, title=f"{title} NLL {metrics['nll']:.3f}"),
                      run_dir / "samples.png")
    return metrics


def _metric_protocol(datamodule) -> dict:
    if getattr(datamodule, "kind", "points") == "images":
        return {"data": datamodule.describe()}
    return {"data": datamodule.describe(),
            "nll": "mean -log pdf of samples under scipy.stats.gaussian_kde (Scott bandwidth) fitted on all "
                   "true points",
            "energy_distance / sliced_w1": "to held-out points (data.heldout)"}


def _save_resolved_config(cfg: DictConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def _resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    """Explicit ckpt_path, else the run dir's own last.ckpt (automatic resume after a crash)."""
    if cfg.get("ckpt_path"):
        load_checkpoint(cfg.ckpt_path)  # validate before Lightning touches it
        return str(cfg.ckpt_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    return str(last) if last.is_file() and cfg.get("auto_resume", True) else None


def fit(cfg: DictConfig, run_dir: Path):
    """Seed, build, save the resolved config, fit (resuming when a checkpoint exists), plot the loss curve."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    parts = build(cfg)
    _save_resolved_config(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir)
    t0 = time.perf_counter()
    trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=_resume_path(cfg, run_dir))
    seconds = time.perf_counter() - t0
    _save_loss_curve(run_dir)
    return parts, trainer, seconds


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Fit, then sample with EMA weights, evaluate and plot."""
    t0 = time.perf_counter()
    parts, trainer, train_seconds = fit(cfg, run_dir)
    uses_ema = any(isinstance(c, EMA) for c in trainer.callbacks)
    last = run_dir / "checkpoints" / "last.ckpt"
    protocol = {"task": "train", "checkpoint": str(last), "step": trainer.global_step, "ema": uses_ema,
                "seed": int(cfg.seed), "train_seconds": round(train_seconds, 2), "title": cfg.get("name", ""),
                **_metric_protocol(parts.datamodule)}
    results = generate_and_evaluate(parts.module, parts.datamodule, cfg, run_dir, protocol, wall_start=t0)
    _log_final(trainer, results, run_dir)
    return results


def _save_loss_curve(run_dir: Path) -> None:
    """Read the logged train/loss back from TensorBoard's event files and plot it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(run_dir.rglob("events.out.tfevents.*"))
    steps, losses = [], []
    for path in events:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/loss" in acc.Tags().get("scalars", []):
            for ev in acc.Scalars("train/loss"):
                steps.append(ev.step)
                losses.append(ev.value)
    if steps:
        plots.save_figure(plots.plot_loss_curve(steps, losses, title="train/loss"), run_dir / "loss_curve.png")


def _log_final(trainer, results: dict, run_dir: Path) -> None:
    logger = trainer.logger
    if logger is None or not hasattr(logger.experiment, "add_scalar"):
        return
    for key, value in results["metrics"].items():
        logger.experiment.add_scalar(f"eval/{key}", value, trainer.global_step)
    from matplotlib.image import imread

    for name, tag in (("samples.png", "samples/final"), ("trajectory.png", "samples/trajectory")):
        if (run_dir / name).is_file():
            img = imread(run_dir / name)[..., :3]
            logger.experiment.add_image(tag, (img * 255).astype("uint8"), trainer.global_step, dataformats="HWC")
    logger.experiment.flush()


def _restore(cfg: DictConfig) -> tuple:
    """Checkpoint + its saved config -> (module with weights, datamodule, saved cfg, ckpt, used_ema)."""
    if not cfg.get("ckpt"):
        raise ConfigError("ckpt=null: task=sample/evaluate needs ckpt=<path to a .ckpt>")
    ckpt = load_checkpoint(cfg.ckpt)
    saved = OmegaConf.create(ckpt["config"])
    parts = build(saved)
    state, used_ema = module_state(ckpt, bool(cfg.eval.use_ema))
    parts.module.load_state_dict(state)
    return parts, saved, ckpt, used_ema


def _sampler_override(cfg: DictConfig, saved: DictConfig, schedule):
    """The sampler the user asked for on this command line, else the one the model was trained with."""
    from hydra.core.hydra_config import HydraConfig

    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    chosen = cfg if any(o.lstrip("+~").startswith("sampler") for o in overrides) else saved
    sampler = make(chosen, "sampler")
    check_sampler(sampler, schedule)
    return sampler


def sample(cfg: DictConfig, run_dir: Path) -> dict:
    """Reload a checkpoint with its saved config and draw cfg.eval.n_samples with any sampler."""
    parts, saved, ckpt, used_ema = _restore(cfg)
    _save_resolved_config(cfg, run_dir)
    sampler = _sampler_override(cfg, saved, parts.module.objective.schedule)
    protocol = {"task": "sample", "checkpoint": str(cfg.ckpt), "step": ckpt.get("global_step"), "ema": used_ema,
                "seed": int(cfg.seed), "title": saved.get("name", ""), **_metric_protocol(parts.datamodule)}
    parts.datamodule.setup()
    return generate_and_evaluate(parts.module, parts.datamodule, cfg, run_dir, protocol, sampler=sampler)


def evaluate(cfg: DictConfig, run_dir: Path) -> dict:
    """Metrics for a sample file (samples=<.pt/.npz>) or, like `sample`, for a checkpoint."""
    if not cfg.get("samples"):
        return sample(cfg, run_dir)
    path = Path(cfg.samples)
    if not path.is_file():
        raise ConfigError(f"samples={path}: file not found (expected a samples.pt or samples.npz)")
    samples = (torch.load(path, weights_only=True)["samples"] if path.suffix == ".pt"
               else torch.from_numpy(np.load(path)["samples"]))
    datamodule = make(cfg, "data")
    datamodule.setup()
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = evaluate_samples(samples.float(), datamodule, run_dir, title=path.name)
    results = {"metrics": metrics, "protocol": {"task": "evaluate", "samples": str(path), "n_samples": len(samples),
                                                **_metric_protocol(datamodule)}}
    write_json(run_dir / "results.json", results)
    return results


def explore(cfg: DictConfig, run_dir: Path) -> dict:
    """Look at the data: a grid of random training images (scatter for points) and basic statistics."""
    datamodule = make(cfg, "data")
    datamodule.setup()
    run_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(int(cfg.seed))
    stats = {**datamodule.describe()}
    if getattr(datamodule, "kind", "points") == "images":
        real = datamodule.real_uint8("train", n=int(cfg.get("explore_n", 64)))
        imageio.save_grid(real, run_dir / "data_grid.png")
        f = real.float()
        stats |= {"pixel_mean_per_channel": f.mean((0, 2, 3)).tolist(),
                  "pixel_std_per_channel": f.std((0, 2, 3)).tolist(), "grid_images": len(real)}
        image = imageio.grid_image(real)
    else:
        data = datamodule.reference()
        pick = data[torch.randperm(len(data), generator=g)[:2000]]
        fig = plots.render_samples(pick, datamodule, title=f"{datamodule.name}: 2000 training points")
        plots.save_figure(fig, run_dir / "data_grid.png")
        stats |= {"mean": data.mean(0).tolist(), "std": data.std(0).tolist()}
        image = torch.from_numpy(plots.figure_to_image(fig)).permute(2, 0, 1)
    labels = getattr(datamodule, "labels", None)
    if labels is not None:
        stats["class_counts"] = torch.bincount(labels.flatten().long()).tolist()
    logger = make(cfg, "logger", optional=True)
    if logger is not None and hasattr(logger.experiment, "add_image"):
        logger.experiment.add_image("data/train_grid", image, 0)
        logger.experiment.add_text("data/stats", f"```\n{json.dumps(stats, indent=1)}\n```", 0)
        logger.experiment.flush()
    results = {"metrics": {}, "protocol": {"task": "explore", "seed": int(cfg.seed)}, "stats": stats}
    write_json(run_dir / "results.json", results)
    return results
