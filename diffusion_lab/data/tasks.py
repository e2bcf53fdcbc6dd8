"""Tasks that read a dataset without a model (task=explore|export): a look at the data, and the real images
as a PNG folder for external metric tools. Kept apart from tasks.py, whose tasks train or sample."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from diffusion_lab.build import ConfigError, make
from diffusion_lab.tasks import eval_device, write_json

log = logging.getLogger("diffusion_lab")


def explore(cfg: DictConfig, run_dir: Path) -> dict:
    """Look at the data: a grid of random training images (scatter for points) and basic statistics."""
    datamodule = make(cfg, "data")
    datamodule.setup()
    run_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(int(cfg.seed))
    domain_stats, image = datamodule.domain.explore(datamodule, run_dir, int(cfg.get("explore_n", 64)), g)
    stats = {**datamodule.describe(), **domain_stats}
    labels = getattr(datamodule, "labels", None)
    if labels is not None:
        stats["class_counts"] = torch.bincount(labels.flatten().long()).tolist()
    logger = make(cfg, "logger", optional=True)
    if logger is not None and hasattr(logger.experiment, "add_image"):
        logger.experiment.add_image("data/train_grid", image, 0)
        logger.experiment.add_text("data/stats", f"```\n{json.dumps(stats, indent=1)}\n```", 0)
        logger.experiment.flush()
    results = {"metrics": {}, "protocol": {"task": "explore", "seed": int(cfg.seed), "device": str(eval_device(cfg))},
               "stats": stats}
    write_json(run_dir / "results.json", results)
    return results


def export(cfg: DictConfig, run_dir: Path, split: str = "train", n: int | None = None) -> dict:
    """task=export: the real images of cfg.data's task.split (task.n: a seeded subset, the one the suite's
    reference features use) as <run_dir>/real/000000.png ..., lossless uint8, for external metric tools."""
    from diffusion_lab.imageio import export_pngs

    datamodule = make(cfg, "data")
    if not hasattr(datamodule, "real_uint8"):  # point data (STATES, moons): nothing an image metric could read
        name = getattr(datamodule, "name", type(datamodule).__name__)
        raise ConfigError(f"task=export: data {name!r} is not image data; export writes image PNGs "
                          "(data=mnist|cifar10|celeba64|imagefolder)")
    split = str(split)
    try:
        images = datamodule.real_uint8(split, None if n is None else int(n))
    except ValueError as exc:  # an unknown split, named by the datamodule ("MNIST has 'train' and 'test'")
        raise ConfigError(f"task.split={split}: {str(exc).splitlines()[0]}") from exc
    out = run_dir / "real"
    count = export_pngs(images, out)
    results = {"metrics": {}, "protocol": {"task": "export", "dataset": datamodule.name, "split": split,
                                           "n": count, "subset_seed": int(datamodule.seed), "dir": str(out),
                                           "shape": list(images.shape[1:])}}
    write_json(run_dir / "results.json", results)
    log.info("exported %d real %s images (%s) to %s", count, datamodule.name, split, out)
    return results
