"""Lightning callbacks the library lacks: foreach EMA on WeightAveraging, sample monitoring."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn

from diffusion_lab import plots


class EMA(WeightAveraging):
    """EMA of the weights (Lightning's WeightAveraging) with foreach updates and a start step.

    Lightning's EMAWeightAveraging uses a per-tensor `avg_fn`; `multi_avg_fn` updates all tensors
    with one foreach lerp. Checkpoints hold the EMA weights in "state_dict" and the raw ones in
    "current_model_state"; at the end of fit the EMA weights are copied into the module.
    """

    def __init__(self, decay: float = 0.999, start_step: int = 0, every_n_steps: int = 1,
                 use_buffers: bool = True):
        if not 0 < decay < 1:
            raise ValueError(f"decay={decay}: expected 0 < decay < 1")
        if start_step < 0 or every_n_steps < 1:
            raise ValueError(f"start_step={start_step}, every_n_steps={every_n_steps}: expected >= 0 and >= 1")
        super().__init__(use_buffers=use_buffers, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.decay, self.start_step, self.every_n_steps = decay, start_step, every_n_steps

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step and step_idx % self.every_n_steps == 0


class SampleMonitor(L.Callback):
    """Every N steps: sample from fixed noise (same seed each time) and log a figure to TensorBoard."""

    def __init__(self, every_n_steps: int = 1000, n: int = 2000, seed: int = 1234):
        self.every_n_steps, self.n, self.seed = every_n_steps, n, seed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step % self.every_n_steps or not trainer.is_global_zero:
            return
        samples = pl_module.sample(self.n, generator=torch.Generator().manual_seed(self.seed))
        dm = trainer.datamodule
        fig = plots.render_samples(samples.cpu(), dm, title=f"step {step} (raw weights)")
        logger = trainer.logger
        if logger is not None and hasattr(logger.experiment, "add_image"):
            logger.experiment.add_image("samples/monitor", plots.figure_to_image(fig), step, dataformats="HWC")

