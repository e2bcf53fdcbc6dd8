"""Lightning callbacks the library lacks: foreach EMA on WeightAveraging, sample monitoring, a one-line progress bar
and a model summary with real FLOPs."""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, WeightAveraging
from lightning.pytorch.callbacks import ModelSummary as _ModelSummary


def ema_multi_avg_fn(decay: float, warmup: bool):
    """Foreach EMA update; with warm-up the decay is min(decay, (1 + n) / (10 + n)) after n updates.

    Without warm-up a 0.999 EMA still weights the random initialisation by 0.999^n (22% after 1500
    steps), which ruins short runs; torch's get_ema_multi_avg_fn has no warm-up, hence this function.
    """

    @torch.no_grad()
    def update(ema_params, current_params, num_averaged) -> None:
        n = int(num_averaged)
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        if torch.is_floating_point(ema_params[0]) or torch.is_complex(ema_params[0]):
            torch._foreach_lerp_(ema_params, current_params, 1 - d)
        else:  # integer buffers (BatchNorm's num_batches_tracked): follow the model
            for p_ema, p_model in zip(ema_params, current_params):
                p_ema.copy_(p_model)

    return update


class EMA(WeightAveraging):
    """EMA of the weights (Lightning's WeightAveraging) with foreach updates, warm-up and a start step.

    Lightning's EMAWeightAveraging uses a per-tensor `avg_fn` without warm-up; this one updates all
    tensors with one foreach lerp. Checkpoints hold the EMA weights in "state_dict" and the raw ones in
    "current_model_state"; at the end of fit the EMA weights are copied into the module (also when a fit
    resumed at max_steps trains no step: Lightning then skips on_train_end, see `use_average`).
    """

    def __init__(self, decay: float = 0.999, start_step: int = 0, every_n_steps: int = 1,
                 use_buffers: bool = True, warmup: bool = True):
        if not 0 < decay < 1:
            raise ValueError(f"decay={decay}: expected 0 < decay < 1")
        if start_step < 0 or every_n_steps < 1:
            raise ValueError(f"start_step={start_step}, every_n_steps={every_n_steps}: expected >= 0 and >= 1")
        super().__init__(use_buffers=use_buffers, multi_avg_fn=ema_multi_avg_fn(decay, warmup))
        self.decay, self.start_step, self.every_n_steps = decay, start_step, every_n_steps

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step and step_idx % self.every_n_steps == 0

    def use_average(self, pl_module) -> None:
        """Put the EMA weights into the module for sampling after fit. Idempotent after on_train_end; needed
        when fit resumed a finished run (no step runs, on_train_end is skipped, the module holds the raw
        weights the checkpoint restored)."""
        if self._average_model is not None:
            self._copy_average_to_current(pl_module)


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that also saves at the final training step.

    With every_n_train_steps=1000 and max_steps=3500 the stock callback's last save is step 3000, so
    last.ckpt would not hold the weights the run sampled from and a resume or task=sample could not
    reproduce the run. The final save goes through the same top-k/last path as the periodic ones (so EMA
    and optimizer state are saved as usual); Lightning orders checkpoint callbacks after the others, so the
    EMA update of the last step is in it.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if 0 < trainer.max_steps <= trainer.global_step:
            self._save_final(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs:
            self._save_final(trainer)

    def _save_final(self, trainer) -> None:
        if self._last_global_step_saved == trainer.global_step or self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


class SampleMonitor(L.Callback):
    """Every N steps: sample from the same fixed noise and log it (grid for images, scatter for points).

    Uses the raw (not EMA) weights, so the picture shows what the optimizer is doing right now.
    Each picture is also saved as <run_dir>/monitor/step_<step, 7 digits>.png.
    """

    def __init__(self, every_n_steps: int = 1000, n: int = 2000, seed: int = 1234, at_epochs: list | None = None):
        self.every_n_steps, self.n, self.seed = every_n_steps, n, seed
        self.at_epochs = set(at_epochs or [])  # 1-based epochs after which a grid is also saved

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and trainer.is_global_zero:
            self._log(trainer, pl_module, f"step_{step:07d}", step)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if epoch in self.at_epochs and trainer.is_global_zero:
            self._log(trainer, pl_module, f"epoch_{epoch:03d}", trainer.global_step)

    def _log(self, trainer, pl_module, name: str, step: int) -> None:
        classes = int(getattr(pl_module, "num_classes", 0))
        per_class = max(1, self.n // classes) if classes else self.n
        # A class-conditional model shows every class (per_class each) with the run's guidance.
        cond = torch.arange(classes).repeat_interleave(per_class) if classes else None
        samples = pl_module.sample(per_class * max(classes, 1), generator=torch.Generator().manual_seed(self.seed),
                                   cond=cond).float().cpu()
        dm = trainer.datamodule
        writer = getattr(trainer.logger, "experiment", None) if trainer.logger else None
        image = dm.domain.picture(dm, samples, labels=cond, per_class=per_class, title=f"{name} (raw weights)",
                                  path=Path(trainer.default_root_dir) / "monitor" / f"{name}.png")
        if hasattr(writer, "add_image"):
            writer.add_image("samples/monitor", image, step, dataformats="HWC")


class Throughput(L.Callback):
    """Logs train/samples_per_sec at every logging step, as History (below, on every fit) measured it: one timer,
    one host sync per interval.

    Why not Lightning's ThroughputMonitor (it would need only a batch_size_fn): it calls
    torch.cuda.synchronize() after every training batch (throttling the sync-free GPU path, see
    train.nonfinite_check) and logs samples/s only once a full window of batches (100 by default) has passed,
    so short runs and the first interval of every run report nothing; this logs each interval, with one sync.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = next((c for c in trainer.callbacks if isinstance(c, History)), None)
        if record is not None and record.steps and record.steps[-1] == trainer.global_step:
            pl_module.log("train/samples_per_sec", record.samples_per_sec[-1])


class History(L.Callback):
    """The training loss and throughput of every logging step, kept in process and in the checkpoint (so a
    resumed run has its whole history), whatever logger ran (tensorboard, csv, none): report.md and the loss
    curve read them from here, and Throughput logs its samples/s. Added by build_trainer to every fit, ahead of
    the configured callbacks (Lightning calls them in list order, so Throughput reads this step's value).

    The loss is the training_step's return value, read on logging steps only (one host sync per interval, as
    Lightning's own logging); throughput is items per second of wall time between logging steps."""

    def __init__(self):
        self.steps: list[int] = []
        self.loss: list[float] = []
        self.samples_per_sec: list[float] = []
        self._t0, self._count = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0, self._count = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # items: raw images/points ("x") or cached latent posteriors ("posterior")
        self._count += next((len(v) for k, v in batch.items() if k != "cond"), 0) if isinstance(batch, dict) else 0
        step = trainer.global_step
        if step % max(1, trainer.log_every_n_steps) or (self.steps and self.steps[-1] >= step):
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:  # a skipped (non-finite) step
            return
        elapsed = time.perf_counter() - self._t0
        self.steps.append(step)
        self.loss.append(float(loss))
        self.samples_per_sec.append(self._count / max(elapsed, 1e-9))
        self._t0, self._count = time.perf_counter(), 0

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "loss": list(self.loss), "samples_per_sec": list(self.samples_per_sec)}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.loss = list(state.get("steps", [])), list(state.get("loss", []))
        self.samples_per_sec = list(state.get("samples_per_sec", []))


class Sleep(L.Callback):
    """Sleep after every training batch: makes a tiny run slow enough to interrupt in tests and demos."""

    def __init__(self, seconds: float = 0.1):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


class MetricMonitor(L.Callback):
    """In-training evaluation every N steps with a small n, logged to TensorBoard as eval_during/<metric>.

    Images: FID / KID (torch-fidelity Inception, reference features cached on disk); points: the KDE NLL
    and distances. Uses the raw weights and fixed noise. Under DDP every rank draws its shard of the n
    samples, they are gathered once, and rank 0 scores them.
    """

    def __init__(self, every_n_steps: int = 5000, n: int = 1000, metrics: tuple = ("fid", "kid"),
                 weights: str | None = None, cache_dir: str | None = None, reference_split: str = "train",
                 seed: int = 4321, batch_size: int | None = None):
        if every_n_steps < 0 or n < 2:
            raise ValueError(f"every_n_steps={every_n_steps}, n={n}: expected >= 0 (0 = off) and >= 2")
        self.every_n_steps, self.n, self.metrics, self.seed = every_n_steps, n, list(metrics), seed
        self.weights, self.cache_dir, self.reference_split, self.batch_size = weights, cache_dir, reference_split, \
            batch_size
        self._extractor = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps:
            return
        samples = pl_module.sample_sharded(self.n, self.seed, batch_size=self.batch_size).float().cpu()
        if not trainer.is_global_zero:
            return
        values = self.score(samples, trainer.datamodule, pl_module.device)
        writer = getattr(trainer.logger, "experiment", None) if trainer.logger else None
        if hasattr(writer, "add_scalar"):
            for key, value in values.items():
                writer.add_scalar(f"eval_during/{key}", value, step)
            writer.flush()

    def score(self, samples: torch.Tensor, datamodule, device) -> dict:
        return datamodule.domain.score(datamodule, samples, self, device)


def planned_epochs(trainer) -> int | None:
    """Epochs the fit will run: max_epochs, or max_steps over the batches per epoch; None when only a time
    budget (or nothing) ends it."""
    if trainer.max_epochs not in (None, -1):
        return int(trainer.max_epochs)
    batches = trainer.num_training_batches
    if trainer.max_steps and trainer.max_steps > 0 and batches and math.isfinite(batches):
        return math.ceil(trainer.max_steps / (batches // max(1, trainer.accumulate_grad_batches) or 1))
    return None


class ProgressBar(RichProgressBar):
    """Lightning's Rich bar on one line: "Epoch 3/12" counted from 1 (the stock bar prints max_epochs - 1,
    i.e. "Epoch 14/-2" for a run ended by max_steps), a bar that shrinks to the terminal's width instead of
    wrapping, and only the metrics logged with prog_bar=True (no TensorBoard version number)."""

    def __init__(self, refresh_rate: int = 10, leave: bool = False):
        super().__init__(refresh_rate=refresh_rate, leave=leave)

    def _get_train_description(self, current_epoch: int) -> str:
        total = planned_epochs(self.trainer)
        return f"Epoch {current_epoch + 1}" + (f"/{total}" if total else "")

    def configure_columns(self, trainer) -> list:
        columns = super().configure_columns(trainer)
        columns[1].bar_width = None  # the bar takes what the other columns leave of the console width
        return columns

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return {k.removeprefix("train/"): v for k, v in items.items()}


class ModelSummary(_ModelSummary):
    """Lightning's layer table without its FLOPs column, which counts only with an example_input_array (this
    module's nets take (x, t, cond), so it read 0 everywhere); the total line states the real FLOPs of one
    denoiser forward instead (compute.py: one multiply-add = one FLOP), when the module is a diffusion one."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self._module = pl_module
        super().on_fit_start(trainer, pl_module)

    def summarize(self, summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops=0, **kwargs) -> None:
        from lightning.pytorch.callbacks.model_summary import log
        from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

        columns = [c for c in summary_data if c[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      0, *columns)
        lines = [line for line in table.splitlines() if not line.rstrip().endswith("Total Flops")]
        module = getattr(self, "_module", None)
        if hasattr(module, "sample_shape") and hasattr(module, "net"):
            from diffusion_lab import compute

            flops = compute.module_forward_flops(module)
            lines.append(f"{flops / 1e9:<10.4g}GFLOPs per denoiser forward (1 sample; 1 multiply-add = 1 FLOP)")
        log.info("\n" + "\n".join(lines))
