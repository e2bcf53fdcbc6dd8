"""Thin LightningModule: space + objective + net + optimizer + sampler. The maths lives elsewhere."""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor, nn

from diffusion_lab import compute
from diffusion_lab.errors import RunError
from diffusion_lab.objectives import Objective
from diffusion_lab.optim import optimizer_config
from diffusion_lab.samplers import make_denoiser
from diffusion_lab.spaces import Space

log = logging.getLogger("diffusion_lab")


class NonFiniteLossError(RunError):
    """Training produced a NaN/inf loss (or, with nonfinite=skip, too many in a row); raised before the optimizer
    step, so no weight is touched. One line at the CLI."""


class DiffusionModule(L.LightningModule):
    """Trains `net` with `objective.loss`; `sample` runs `sampler` over the (net, objective) denoiser.

    Options: `channels_last` (images), `compile` (torch.compile of the training forward),
    `nonfinite` ("raise" stops naming the step, "skip" drops the step), `nonfinite_check` (when the
    host looks at the loss, see below), `overfit` (fixed t and noise every step: with one fixed batch
    the loss must go to ~0, a wiring check).

    Non-finite losses never reach the weights. nonfinite_check="step" reads the loss on the host every
    step (free on a CPU, a pipeline stall per step on a GPU). "deferred" keeps the step sync-free: the
    fused optimizer gets the loss's non-finite flag as its `found_inf` (the GradScaler mechanism), so the
    update is skipped on the device, and the host reads the flag only on logging steps, before every
    checkpoint, at least every `nonfinite_check_every` steps and at the end, raising there (naming the first
    bad step; at most nonfinite_check_every - 1 steps late) or logging the skipped count.
    "auto" is deferred on accelerators with a fused optimizer and no GradScaler, else step.
    nonfinite="skip" warns on the console at the first skip and stops after `max_consecutive_skips` bad
    steps in a row: a run that skips every step is diverging, not training.
    """

    def __init__(self, net: nn.Module, objective: Objective, optimizer: Callable, sampler: Callable,
                 space: Space, lr_scheduler: Callable | None = None,
                 config: dict | None = None, channels_last: bool = False, compile: bool = False,
                 nonfinite: str = "raise", overfit: bool = False, guidance=None,
                 sample_precision: str | None = None, compile_mode: str | None = None,
                 nonfinite_check: str = "auto", nonfinite_check_every: int = 10, max_consecutive_skips: int = 20):
        super().__init__()
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite={nonfinite!r}: expected 'raise' or 'skip'")
        if nonfinite_check not in ("auto", "step", "deferred"):
            raise ValueError(f"nonfinite_check={nonfinite_check!r}: expected 'auto', 'step' or 'deferred'")
        if nonfinite_check_every < 1 or max_consecutive_skips < 1:
            raise ValueError(f"nonfinite_check_every={nonfinite_check_every}, max_consecutive_skips="
                             f"{max_consecutive_skips}: expected integers >= 1")
        self.nonfinite_check, self.nonfinite_check_every = nonfinite_check, nonfinite_check_every
        self.max_consecutive_skips = max_consecutive_skips
        self._deferred = False  # set in on_train_start
        # device-side counters of the deferred check: bad steps, first bad step, current and longest run
        self._bad_steps = self._first_bad = self._run = self._longest = None
        self._skips = self._consecutive = 0  # host counters of the per-step check
        self.net, self.objective, self.sampler = net, objective, sampler
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        # The space maps batches to model space and samples back to data. It is not a submodule: a frozen
        # autoencoder inside it stays out of the state_dict, the optimizer and the EMA copy.
        self.space = space
        self.sample_shape = tuple(space.shape)
        self.config = config  # resolved run config, stored in every checkpoint (reload = build + load)
        self.channels_last = channels_last and len(self.sample_shape) == 3
        self.nonfinite, self.overfit = nonfinite, overfit
        # compile_mode: torch.compile's mode; "reduce-overhead" captures CUDA graphs (small nets on GPUs,
        # where launch overhead dominates), "max-autotune" also searches kernels. None: the default mode.
        if compile_mode not in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ValueError(f"compile_mode={compile_mode!r}: expected null, 'default', 'reduce-overhead', "
                             "'max-autotune' or 'max-autotune-no-cudagraphs'")
        self.compile, self.compile_mode = compile, compile_mode
        # Guidance (diffusion_lab.guidance) is a sampling setting, not a submodule: its classifier stays
        # out of the state_dict and the EMA. sample_precision: autocast dtype for sampling (None = fp32).
        if sample_precision not in (None, "bf16", "fp16"):
            raise ValueError(f"sample_precision={sample_precision!r}: expected None, 'bf16' or 'fp16'")
        self.guidance, self.sample_precision = guidance, sample_precision
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        # samples fed and training seconds over every launch of this run (checkpoint["compute"])
        self.ledger = compute.TrainingLedger()

    def on_fit_start(self) -> None:
        # Small datasets live on the training device: batches are then index draws, no H2D copies.
        to_device = getattr(self.trainer.datamodule, "to_device", None)
        if to_device is not None:
            to_device(self.device)
        self.space.to(self.device)

    def _train_net(self):
        """The net for training forwards: torch.compile'd lazily, kept out of the module tree so the
        state_dict and the EMA copy only ever see `net`."""
        if not self.compile:
            return self.net
        if "_compiled" not in self.__dict__:
            self.__dict__["_compiled"] = torch.compile(self.net, mode=self.compile_mode)
        return self.__dict__["_compiled"]

    def _prepare(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def encode(self, batch: dict, generator: torch.Generator | None = None) -> Tensor:
        """A batch of raw items (or cached posteriors) -> model space x0, in the net's memory format."""
        return self._prepare(self.space.encode_batch(batch, generator))

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        generator = torch.Generator(self.device).manual_seed(0) if self.overfit else None
        x0 = self.encode(batch, generator)  # latent spaces: a fresh posterior draw per step (global RNG)
        per_sample, t = self.objective.loss(self._train_net(), x0, batch.get("cond"), generator=generator)
        loss = per_sample.mean()
        if self._deferred:
            self._flag_nonfinite(~torch.isfinite(loss.detach()))
        elif not torch.isfinite(loss):  # one host sync per step: the price of never saving NaN weights
            if self.nonfinite == "skip":
                self._skipped(1, 1 + self._consecutive, self.global_step)
                self.log("train/skipped_nonfinite", 1.0, reduce_fx="sum")
                return None  # Lightning skips backward and the optimizer step
            raise NonFiniteLossError(f"non-finite training loss ({loss.item()}) at step {self.global_step}; "
                                     "no checkpoint was written with it")
        else:
            self._consecutive = 0
        self.ledger.count(x0.shape[0])  # a host int: the batch's shape is known without a sync
        self.log("train/loss", loss, prog_bar=True)
        if not self._is_log_step():  # self.log costs ~0.7 ms a call: a fifth of a small model's step
            return loss
        # training FLOPs so far (3 x forward x samples, compute.py) next to the loss, read against compute
        self.log("compute/train_flops", float(compute.train_flops(
            compute.module_forward_flops(self), self.ledger.samples(self.trainer.world_size))))
        # Loss per timestep quartile: where in t the model is still bad (t=0 data, t=1 noise).
        quartile = (t * 4).ceil().clamp(1, 4).long() - 1
        sums = torch.zeros(4, device=t.device).index_add_(0, quartile, per_sample.detach().float())
        counts = torch.bincount(quartile, minlength=4).clamp(min=1)
        for q, value in enumerate(sums / counts):
            self.log(f"train/loss_t_q{q + 1}", value)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """The training loss on held-out data (the datamodule's val_dataloader) with the same t and noise at
        every validation (seeded per batch), so the curve moves only when the model does."""
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        x0 = self.encode(batch, generator)
        per_sample, _ = self.objective.loss(self.net, x0, batch.get("cond"), generator=generator)
        self.log("val/loss", per_sample.mean(), batch_size=len(x0))

    def _fused_without_scaler(self, optimizer) -> bool:
        """A fused optimizer (it unscales internally) and no fp16 GradScaler: its grads are the true grads
        and its `found_inf` is ours to set."""
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        return fused and getattr(self.trainer.precision_plugin, "scaler", None) is None

    def on_train_start(self) -> None:
        # Resolved once per fit: whether the non-finite guard runs deferred (see the class docstring).
        optimizer = self.trainer.optimizers[0] if self.trainer.optimizers else None
        usable = self._fused_without_scaler(optimizer)
        if self.nonfinite_check == "deferred" and not usable:
            raise ValueError("train.nonfinite_check=deferred needs a fused optimizer (optimizer.fused=true) "
                             "and no fp16 GradScaler")
        self._deferred = self.nonfinite_check == "deferred" or (
            self.nonfinite_check == "auto" and usable and self.device.type != "cpu")
        self.ledger.start()
        compute.module_forward_flops(self)  # one batch-1 forward under the FLOP counter, kept for the run

    def _flag_nonfinite(self, bad: Tensor) -> None:
        """Deferred check, no host sync: the fused step skips the update where `bad`, counters stay on
        the device, and the host reads them on logging steps (before this step's update)."""
        self.trainer.optimizers[0].found_inf = bad.float()
        if self._bad_steps is None:
            self._bad_steps = torch.zeros((), dtype=torch.long, device=bad.device)
            self._first_bad = torch.full((), -1, dtype=torch.long, device=bad.device)
            self._run = torch.zeros((), dtype=torch.long, device=bad.device)
            self._longest = torch.zeros((), dtype=torch.long, device=bad.device)
        self._first_bad = torch.where((self._first_bad < 0) & bad, self.global_step, self._first_bad)
        self._bad_steps += bad
        self._run = torch.where(bad, self._run + 1, 0)
        self._longest = torch.maximum(self._longest, self._run)
        if self._is_log_step() or (self.global_step + 1) % self.nonfinite_check_every == 0:
            self._check_nonfinite()

    def _check_nonfinite(self, final: bool = False) -> None:
        """Host read of the deferred counters: raise naming the first bad step, or log the skipped count."""
        if self._bad_steps is None:
            return
        count = int(self._bad_steps)
        if not count:
            return
        if self.nonfinite == "skip":
            self._skipped(count, int(self._longest), int(self._first_bad))
            self._longest.zero_()
            self._first_bad.fill_(-1)
        if self.nonfinite == "raise":
            raise NonFiniteLossError(f"non-finite training loss at step {int(self._first_bad)} ({count} step(s) "
                                     "so far); the fused optimizer skipped those updates on the device, and no "
                                     "checkpoint was written with them")
        if not final:
            self.log("train/skipped_nonfinite", float(count), reduce_fx="sum")
        elif self.logger is not None:  # skips after the last logging step: self.log is not allowed at the end
            self.logger.log_metrics({"train/skipped_nonfinite": float(count)}, step=self.global_step)
        self._bad_steps.zero_()

    def _skipped(self, count: int, consecutive: int, first: int) -> None:
        """nonfinite=skip bookkeeping on the host: warn at the first skip, stop a run that keeps diverging."""
        if self._skips == 0:
            log.warning("non-finite training loss at step %d: step skipped (train.nonfinite=skip; the run stops "
                        "after %d in a row)", first, self.max_consecutive_skips)
        self._skips += count
        self._consecutive = consecutive
        if consecutive >= self.max_consecutive_skips:
            raise NonFiniteLossError(f"train.max_consecutive_skips={self.max_consecutive_skips}: {consecutive} "
                                     f"non-finite steps in a row by step {self.global_step} ({self._skips} skipped "
                                     "in all); the run is diverging (lower optimizer.lr or check the data)")

    def on_train_end(self) -> None:
        self.ledger.stop()
        self._check_nonfinite(final=True)
        if self._skips:
            # per-step check: skipped batches do not advance global_step; deferred: the fused step skips on device
            total = self.global_step + (0 if self._deferred else self._skips)
            log.warning("train.nonfinite=skip: %d of %d steps were skipped (non-finite loss)", self._skips, total)

    def _is_log_step(self) -> bool:
        """Steps whose extra metrics reach the logger: Lightning writes step k when (k + 1) is a multiple of
        trainer.log_every_n_steps (LoggerConnector.should_update_logs); a value logged on any other step would
        be written several steps late under the wrong step number."""
        return (self.trainer.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0

    def on_before_optimizer_step(self, optimizer) -> None:
        # Grad norm only on logging steps: computing it every step would add a host sync.
        if self._is_log_step():
            grads = [p.grad for p in self.net.parameters() if p.grad is not None]
            if grads:
                self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    def configure_optimizers(self):
        return optimizer_config(self.net.parameters(), self.optimizer_factory, self.lr_scheduler_factory)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning refuses to clip under any mixed precision when the optimizer unscales internally (fused
        # Adam/AdamW), but only a GradScaler (fp16) makes that unsafe: with bf16 or fp32 the grads are the
        # true grads, so clip them here (foreach kernels) and keep the fused optimizer step.
        if gradient_clip_val and self._fused_without_scaler(optimizer):
            algorithm = str(getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm) or "norm")
            params = [p for p in self.net.parameters() if p.grad is not None]
            if algorithm == "norm":
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)
            else:
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val, foreach=True)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    @property
    def num_classes(self) -> int:
        return int(getattr(self.net, "num_classes", 0) or 0)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, cond: Tensor | None = None,
               sampler: Callable | None = None, callback=None, batch_size: int | None = None,
               guidance=None) -> Tensor:
        """Draw n samples (noise from `generator`, on the module's device) in batches, decoded to data by the
        space (once, here: [-1, 1] pixels for every latent or pixel space, or points).

        cond: labels (n,), -1 for unconditional rows; guidance: a diffusion_lab.guidance object
        (default: the module's own, from the config), applied only where labels are given. `callback` sees
        model-space states (domains.Frames decodes the few it keeps).
        """
        sampler = sampler or self.sampler
        guidance = guidance if guidance is not None else self.guidance
        if cond is not None and len(cond) != n:
            raise ValueError(f"cond has {len(cond)} labels for n={n} samples")
        if guidance is not None:
            guidance.to(self.device)
        self.space.to(self.device)
        was_training = self.net.training
        self.net.eval()
        noise = torch.randn((n, *self.sample_shape), generator=generator,
                            device=getattr(generator, "device", "cpu")).to(self.device)
        batch_size = batch_size or n
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.sample_precision)
        out = []
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            for start in range(0, n, batch_size):
                sl = slice(start, start + batch_size)
                c = None if cond is None else cond[sl].to(self.device)
                denoise = (guidance.denoiser(self.net, self.objective, c) if guidance is not None
                           else make_denoiser(self.net, self.objective, c))
                out.append(sampler(denoise, self.objective.schedule, self._prepare(noise[sl]), generator=generator,
                                   callback=callback).float())
        self.net.train(was_training)
        return self.space.decode(torch.cat(out).contiguous()).contiguous()  # fp32, outside autocast

    @property
    def is_rank_zero(self) -> bool:
        """True without a trainer (task=sample) and on global rank 0 under DDP."""
        return self._trainer is None or self._trainer.is_global_zero

    def sample_sharded(self, n: int, seed: int, cond: Tensor | None = None, **kwargs) -> Tensor:
        """n samples drawn across DDP ranks (each its ceil(n / world) share, noise seeded by seed + rank,
        labels split the same way), gathered once: every rank gets all n. With one process this is
        `sample(n, Generator().manual_seed(seed), cond)`. kwargs go to `sample`."""
        trainer = self._trainer
        world = trainer.world_size if trainer is not None else 1
        if world == 1:
            return self.sample(n, torch.Generator().manual_seed(seed), cond=cond, **kwargs)
        rank, per = trainer.global_rank, -(-n // world)
        mine = None
        if cond is not None:  # pad to world * per with the first labels (dropped after gathering)
            mine = torch.cat([cond, cond[: per * world - n]])[rank * per:(rank + 1) * per]
        x = self.sample(per, torch.Generator().manual_seed(seed + rank), cond=mine, **kwargs)
        return self.all_gather(x).flatten(0, 1)[:n]

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict: bool | None = None,
                             weights_only: bool | None = None, use_ema: bool = True, **kwargs) -> DiffusionModule:
        """Lightning's loader, for diffusion_lab checkpoints: the module is built from the config the checkpoint
        stores (the run's resolved config, allow-listed before anything is built: files are data) and gets its
        weights, the EMA ones by default (use_ema=False: the raw ones), and its space's stored state; eval mode.

        Lightning's own version would call `cls(**checkpoint["hyper_parameters"])`, but the constructor takes
        built objects (net, objective, sampler, ...), not config values; build.restore is the one reload path
        (the same as task=sample and diffusion_lab.load). map_location: a device ("cpu", "cuda:0")."""
        from diffusion_lab.build import restore  # build sits above this module

        if hparams_file is not None or kwargs or strict is False or weights_only is False:
            given = {"hparams_file": hparams_file, "strict": strict, "weights_only": weights_only, **kwargs}
            unsupported = {k: v for k, v in given.items() if k in kwargs or v is not None}
            raise TypeError(f"{cls.__name__}.load_from_checkpoint: {unsupported} not supported; the stored config "
                            "defines the model, weights load strictly and as weights only (use diffusion_lab.load "
                            "for sampler, guidance or precision choices)")
        if map_location is not None and not isinstance(map_location, (str, torch.device)):
            raise TypeError(f"map_location={map_location!r}: expected a device such as 'cpu' or 'cuda:0'")
        parts, *_ = restore(checkpoint_path, use_ema=use_ema, key="checkpoint_path")
        return parts.module.to(map_location or "cpu").eval()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.nonfinite == "raise" and self._trainer is not None and self.trainer.training:
            self._check_nonfinite()  # deferred check: a checkpoint is never written after a bad step
        checkpoint["config"] = self.config
        checkpoint["space"] = self.space.state()  # latent scaling + autoencoder sha256: decode like this run
        if self._trainer is not None:
            checkpoint["compute"] = self.ledger.state(self.trainer)  # samples seen, training seconds so far
        # Global RNG (t and eps draws, dropout) so a resumed run continues the same random stream.
        checkpoint["rng"] = {"torch": torch.get_rng_state(),
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("space"):
            self.space.load_state(checkpoint["space"])
        self.ledger.load(checkpoint.get("compute"))
        rng = checkpoint.get("rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
