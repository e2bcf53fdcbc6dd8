"""Our side of every comparison, run through the real code paths of `run.py`.

Training: the experiment config composed by Hydra, `build()` and `build_trainer()` with the run's own
callbacks (EMA, throughput, LR monitor), logger (TensorBoard, writing every log_every_n_steps) and
precision; only checkpoints, sample grids and the progress bar are off (periodic, not per step).
Sampling: `DiffusionModule.sample`, the path `task=sample` and the end-of-run evaluation take.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from harness import LoopTimer, sync
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from diffusion_lab.build import build, build_trainer
from diffusion_lab.data.images import RandomFlip
from diffusion_lab.data.lowdim import InMemoryBatches
from diffusion_lab.domains import ImageDomain
from diffusion_lab.samplers import sample_ddim

ROOT = Path(__file__).resolve().parents[1]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def bench_cfg(experiment: str, precision: str, channels_last: bool, steps: int, extra: list[str] = ()):
    """A real experiment config with the periodic, non-per-step outputs turned off."""
    cfg = compose_cfg([f"experiment={experiment}", f"trainer.precision={precision}",
                       f"train.channels_last={str(channels_last).lower()}", f"trainer.max_steps={steps}",
                       "callbacks.checkpoint=null", "callbacks.samples=null", "callbacks.progress=null",
                       "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", *extra])
    with open_dict(cfg):  # outside a Hydra run: no ${hydra:...} run dir to resolve
        cfg.name, cfg.run_dir = "bench", str(Path(tempfile.gettempdir()) / "diffusion_lab_bench")
    return cfg


class StepTimer(L.Callback):
    """Times training steps after the warm-up; synchronises the device only at the two ends. The last
    step ends at its on_train_batch_end: the end-of-fit work (EMA weight swap, teardown) is not a step."""

    def __init__(self, device: str, warmup: int):
        self.timer, self.last_end = LoopTimer(device, warmup), None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.timer.tick(trainer.global_step, batch["x"].shape[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= trainer.max_steps:
            sync(self.timer.device)
            self.last_end = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.timer.stop(at=self.last_end)


class ResidentData(L.LightningDataModule):
    """Given uint8 images served exactly like ImageDataModule serves them (resident, per-batch flip and
    scaling): the same bytes the diffusers side trains on."""

    domain = ImageDomain()

    def __init__(self, u8: torch.Tensor, batch_size: int, hflip: bool):
        super().__init__()
        self.shape = tuple(u8.shape[1:])
        # uint8 batches, as the image datamodules yield them: the module's space maps them to [-1, 1]
        self.loader = InMemoryBatches(u8, None, batch_size, 10**6, seed=0, transform=RandomFlip(hflip))

    def to_device(self, device) -> None:
        self.loader.to(device)

    def train_dataloader(self):
        return self.loader


def train(cfg, device: str, warmup: int, datamodule=None) -> tuple[float, object]:
    """Train cfg for cfg.trainer.max_steps steps; img/s after `warmup` steps, and the trained module."""
    run_dir = Path(tempfile.mkdtemp(prefix="diffusion_lab_bench_"))
    try:
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
            cfg.trainer.accelerator = device
        parts = build(cfg)
        timer = StepTimer(device, warmup)
        trainer = build_trainer(cfg, run_dir)
        trainer.callbacks.append(timer)
        trainer.fit(parts.module, datamodule=datamodule or parts.datamodule)
        return timer.timer.rate, parts.module
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def module_for(cfg, device: str):
    """An untrained DiffusionModule of cfg on `device` (sampling speed does not depend on the weights)."""
    return build(cfg).module.to(device)


@torch.no_grad()
def sample(module, n: int, steps: int, device: str, precision: str | None, seed: int = 0,
           sampler=sample_ddim, **kwargs) -> torch.Tensor:
    """`module.sample` with `sampler` (default DDIM(eta=0)) over `steps` steps at autocast `precision` (bf16/None)."""
    module.sample_precision = precision
    sampler = partial(sampler, steps=steps, **kwargs)
    out = module.sample(n, generator=torch.Generator().manual_seed(seed), sampler=sampler)
    sync(device)
    return out


def null_module(cfg, device: str):
    """Our module with a zero-cost net: times the sampling loop's own overhead per step."""
    module = module_for(cfg, device)

    class Null(torch.nn.Module):
        def forward(self, x, t, cond=None):
            return torch.zeros_like(x)

    module.net = Null()
    return module


def model_cfg(cfg) -> dict:
    return OmegaConf.to_container(cfg.model, resolve=True)
