"""Thin LightningModule: objective + net + optimizer + sampler. The maths lives elsewhere."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor, nn

from diffusion_lab.objectives import Objective
from diffusion_lab.samplers import make_denoiser


class DiffusionModule(L.LightningModule):
    """Trains `net` with `objective.loss`; `sample` runs `sampler` over the (net, objective) denoiser."""

    def __init__(self, net: nn.Module, objective: Objective, optimizer: Callable, sampler: Callable,
                 sample_shape: tuple[int, ...], lr_scheduler: Callable | None = None,
                 config: dict | None = None):
        super().__init__()
        self.net, self.objective, self.sampler = net, objective, sampler
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.sample_shape = tuple(sample_shape)
        self.config = config  # resolved run config, stored in every checkpoint (reload = build + load)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        per_sample, t = self.objective.loss(self.net, batch["x"], batch.get("cond"))
        loss = per_sample.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {float(loss)} at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True)
        # Loss per timestep quartile: where in t the model is still bad (t=0 data, t=1 noise).
        quartile = (t * 4).ceil().clamp(1, 4).long() - 1
        sums = torch.zeros(4, device=t.device).index_add_(0, quartile, per_sample.detach().float())
        counts = torch.bincount(quartile, minlength=4).clamp(min=1)
        for q, value in enumerate(sums / counts):
            self.log(f"train/loss_t_q{q + 1}", value)
        return loss

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.net.parameters())
        if self.lr_scheduler_factory is None:
            return opt
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": self.lr_scheduler_factory(opt), "interval": "step"}}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, cond: Tensor | None = None,
               sampler: Callable | None = None, callback=None, batch_size: int | None = None) -> Tensor:
        """Draw n samples (noise from `generator`, on the module's device) in batches."""
        sampler = sampler or self.sampler
        was_training = self.net.training
        self.net.eval()
        noise = torch.randn((n, *self.sample_shape), generator=generator,
                            device=getattr(generator, "device", "cpu")).to(self.device)
        batch_size = batch_size or n
        out = []
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            c = None if cond is None else cond[sl].to(self.device)
            denoise = make_denoiser(self.net, self.objective, c)
            out.append(sampler(denoise, self.objective.schedule, noise[sl], generator=generator,
                               callback=callback))
        self.net.train(was_training)
        return torch.cat(out)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["config"] = self.config
