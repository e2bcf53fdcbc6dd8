"""Classifiers trained by the suite (`task=train_classifier`), saved as their own checkpoints.

noisy=true: a noise-conditional classifier p(y | xt, t) trained on xt = alpha_t x0 + sigma_t eps with the
run's schedule, for classifier guidance (Dhariwal & Nichol 2021; CSE849 project 4).
noisy=false: an ordinary classifier of clean data, the independent judge of conditional samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn import functional as F

from diffusion_lab import plots
from diffusion_lab.build import ConfigError, build_trainer, load_task_net, make, make_space, resolved
from diffusion_lab.callbacks import SampleMonitor
from diffusion_lab.optim import optimizer_config
from diffusion_lab.report import training_facts, write_report
from diffusion_lab.schedules import NoisePath, broadcast_to
from diffusion_lab.spaces import LatentSpace, Space

TASK_TARGET = "diffusion_lab.classifier.train_classifier"


def noised(schedule: NoisePath, x0: Tensor, t: Tensor | None, generator: torch.Generator | None = None):
    """(xt, t): x0 at noise level t (drawn like the diffusion training's t when None)."""
    if t is None:
        t = schedule.sample_t(x0.shape[0], generator=generator, device=x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    alpha, sigma = schedule.alpha_sigma(t)
    return broadcast_to(alpha.to(x0.dtype), x0) * x0 + broadcast_to(sigma.to(x0.dtype), x0) * eps, t


class ClassifierModule(L.LightningModule):
    """Cross-entropy training of `net(xt, t)`; validation (the datamodule's val_dataloader: Lightning takes every
    loader from the datamodule that `fit` gets) at fixed noise draws."""

    def __init__(self, net: nn.Module, schedule: NoisePath, optimizer: Callable, space: Space,
                 lr_scheduler: Callable | None = None, noisy: bool = True, config: dict | None = None):
        super().__init__()
        self.net, self.schedule, self.noisy = net, schedule, noisy
        self.space = space  # the denoiser's model space: the classifier sees what the sampler sees
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.config = config

    def on_fit_start(self) -> None:
        to_device = getattr(self.trainer.datamodule, "to_device", None)
        if to_device is not None:
            to_device(self.device)

    def _loss(self, x0: Tensor, y: Tensor | None, generator=None) -> tuple[Tensor, Tensor]:
        if y is None:
            raise ConfigError("data.num_classes=0: the classifier needs labels (set data.num_classes)")
        x0 = self.space.encode(x0)
        if self.noisy:
            x, t = noised(self.schedule, x0, None, generator)
        else:
            x, t = x0, torch.zeros(x0.shape[0], device=x0.device)
        logits = self.net(x, t).float()
        return F.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, acc = self._loss(batch["x"], batch.get("cond"))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/accuracy", acc)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # The same noise draws at every validation: the curve moves only when the classifier does.
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        loss, acc = self._loss(batch["x"], batch["cond"], generator)
        self.log("val/loss", loss, batch_size=len(batch["x"]))
        self.log("val/accuracy", acc, batch_size=len(batch["x"]), prog_bar=True)

    def configure_optimizers(self):
        return optimizer_config(self.net.parameters(), self.optimizer_factory, self.lr_scheduler_factory)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["config"] = self.config


@torch.no_grad()
def accuracy(net: nn.Module, x: Tensor, y: Tensor, space: Space, schedule: NoisePath | None = None, t: float = 0.0,
             batch_size: int = 2048, seed: int = 0) -> float:
    """Top-1 accuracy of `net` on raw items (x, y) encoded by `space`, noised to level t with seeded noise when
    t > 0."""
    device = next(net.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    correct = 0
    for i in range(0, len(x), batch_size):
        x0 = space.encode(x[i: i + batch_size].to(device))
        tt = torch.full((len(x0),), float(t), device=device)
        xt = noised(schedule, x0, tt, generator)[0] if t > 0 else x0
        correct += int((net(xt, tt).argmax(1).cpu() == y[i: i + batch_size]).sum())
    return correct / len(x)


def load_classifier(path: str | Path, use_ema: bool = True, key: str = "ckpt") -> tuple[nn.Module, dict]:
    """A classifier checkpoint -> (net in eval mode on the CPU, info); weights_only and an allow-listed stored
    config, so no code from the file is executed. `key` names the config key the path came from in errors."""
    net, cfg, ckpt = load_task_net(path, key, TASK_TARGET, "classifier", "a classifier", use_ema)
    info = {"noisy": bool(cfg.task.get("noisy", True)), "schedule": make(cfg, "schedule").describe(),
            "step": ckpt.get("global_step"), "num_classes": int(cfg.data.num_classes), "config": cfg}
    return net, info


def train_classifier(cfg: DictConfig, run_dir: Path, noisy: bool = True,
                     eval_t: Sequence[float] = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)) -> dict:
    """Fit the `classifier` net on the run's data, then report held-out accuracy per noise level t."""
    from diffusion_lab.tasks import _resume_path, _save_loss_curve, _save_resolved_config, write_json

    t0 = time.perf_counter()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if OmegaConf.select(cfg, "classifier") is None:
        raise ConfigError("classifier=null: task=train_classifier needs a classifier net (classifier=mlp|conv)")
    datamodule = make(cfg, "data")
    datamodule.setup()
    if not getattr(datamodule, "num_classes", 0):
        raise ConfigError("data.num_classes=0: task=train_classifier needs labelled data")
    val_split = datamodule.val_split
    if not datamodule.has_split(val_split):  # before any training: the accuracy needs held-out labels
        raise ConfigError(f"data: {datamodule.name} has no {val_split} split for the classifier's validation and "
                          "accuracy; set data.heldout_path=<points file> or data.heldout_fraction=<0..1> (a "
                          "seeded per-class split)")
    schedule = make(cfg, "schedule")
    space = make_space(cfg)
    if isinstance(space, LatentSpace):  # its latent scaling would have to be the guided diffusion model's
        raise ConfigError("space: task=train_classifier works on pixels or points; classifier guidance in a latent "
                          "space is not supported (use guidance=cfg for latent diffusion)")
    module = ClassifierModule(make(cfg, "classifier"), schedule, make(cfg, "optimizer"), space,
                              make(cfg, "lr_scheduler", optional=True), noisy=noisy, config=resolved(cfg))
    _save_resolved_config(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir, exclude=(SampleMonitor,))
    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=_resume_path(cfg, run_dir))
    train_seconds = time.perf_counter() - t_fit
    if not trainer.is_global_zero:  # DDP: rank 0 evaluates and writes
        return {"metrics": {}}
    _save_loss_curve(run_dir, trainer)

    net = module.net.eval()
    x, y = datamodule.labelled(val_split)
    levels = list(eval_t) if noisy else [0.0]
    metrics = {"accuracy": accuracy(net, x, y, space)}
    if noisy:
        metrics |= {f"accuracy_t{t:g}": accuracy(net, x, y, space, schedule, t) for t in levels if t > 0}
    tx, ty = datamodule.labelled("train")
    pick = torch.randperm(len(tx), generator=torch.Generator().manual_seed(0))[:10_000]  # enough for 1% steps
    metrics["train_accuracy"] = accuracy(net, tx[pick], ty[pick], space)
    names = list(getattr(datamodule, "class_names", []) or range(datamodule.num_classes))
    if tuple(datamodule.shape) == (2,):  # 2D points: the map of argmax p(y | x, t) over the plane
        device = next(net.parameters()).device

        @torch.no_grad()
        def predict(xy, t):
            xy = torch.as_tensor(xy, device=device)
            return torch.softmax(net(xy, torch.full((len(xy),), t, device=device)).float(), 1).cpu()

        fig = plots.plot_prediction_maps(predict, *datamodule.labelled("all"), ts=levels if noisy else [0.0],
                                         class_names=names, title=f"{cfg.get('name', '')}: argmax p(y | xt, t)")
        plots.save_figure(fig, run_dir / "prediction_map.png")
    protocol = {"task": "train_classifier", "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
                "step": trainer.global_step, "noisy": noisy, "schedule": schedule.describe(),
                "accuracy_on": f"{val_split} split ({len(x)} examples; noise at t with seed 0)",
                "train_accuracy_on": f"{min(len(tx), 10_000)} random training examples, clean",
                "classes": names, "seed": int(cfg.seed), "train_seconds": round(train_seconds, 2),
                "wall_seconds": round(time.perf_counter() - t0, 2), "data": datamodule.describe()}
    results = {"metrics": metrics, "protocol": protocol}
    write_json(run_dir / "results.json", results)
    facts = training_facts(trainer, net, int(cfg.data.batch_size), train_seconds, run_dir)
    write_report(run_dir, f"{cfg.get('name', 'classifier')}: classifier training report", facts, results,
                 {"Loss curves (train, validation)": "loss_curve.png", "Prediction map": "prediction_map.png"})
    return results
