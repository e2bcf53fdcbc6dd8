"""Use a trained checkpoint from Python (a notebook, a script): `model = diffusion_lab.load("last.ckpt")`.

    x = model.sample(1000, sampler="ddim", steps=50, seed=0)     # (1000, *data shape) in data space, on the CPU
    x = model.sample(100, classes=[0, 3], guidance=3.0)          # 100 per class, classifier-free guidance 3
    x0_hat, eps_hat = model.denoise(xt, t)                        # the one denoiser contract, model space
    results = model.evaluate("eval_dir", n_samples=1000)          # task=sample's metrics, files and results.json

Nothing here is a second implementation: the model comes back through build.restore (the checkpoint's own config,
allow-listed before anything is built, EMA weights by default), samples are drawn by
DiffusionModule.sample_sharded exactly as task=sample draws them (same noise, same batches), and `evaluate` is
task=sample's own body (tasks.sample_restored). Same checkpoint, sampler, steps, n, seed and guidance -> the very
tensor task=sample saves in samples.pt.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor

from diffusion_lab import CONF_DIR
from diffusion_lab.build import ConfigError, check_sampler, make, restore, sample_precision
from diffusion_lab.guidance import ClassifierFree, ClassifierGuidance, requested_labels
from diffusion_lab.samplers import make_denoiser, sampler_name

__all__ = ["Model", "load"]

PRECISIONS = ("32", "32-true", "bf16", "bf16-mixed", "16", "16-mixed")  # eval.precision's values, minus auto


def load(ckpt: str | Path, use_ema: bool = True, device: str | torch.device = "auto",
         allow_targets: Iterable[str] = ()) -> Model:
    """A task=train checkpoint -> Model. use_ema=False: the raw weights; device: auto (CUDA when there is one),
    cpu, cuda:N; allow_targets: your own `_target_`s the stored config may build (as allow_targets=[...] on the
    command line; nothing else a file names is ever instantiated)."""
    from diffusion_lab.safety import allow_user_targets

    allow_user_targets(allow_targets)
    parts, saved, ckpt_dict, used_ema = restore(ckpt, use_ema=use_ema)
    return Model(parts, saved, ckpt_dict, used_ema, Path(ckpt)).to(device)


class Model:
    """A restored diffusion model: `sample`, `denoise`, `evaluate`. `module` is the DiffusionModule (a
    LightningModule), `config` the run's saved config, `space` the map between model space and data."""

    def __init__(self, parts, config: DictConfig, ckpt: dict, ema: bool, path: Path):
        # what task=sample's protocol reads from the checkpoint (not its weights and optimizer state: held once)
        self._parts, self._ckpt = parts, {k: ckpt[k] for k in ("global_step", "compute") if k in ckpt}
        parts.module.eval()  # inference: dropout off for direct calls of model.module.net too
        self.module, self.config, self.ema, self.checkpoint = parts.module, config, ema, path
        self.step = ckpt.get("global_step")
        self._own_guidance = self.module.guidance  # the checkpoint's guidance config (None: unguided)

    @property
    def space(self):
        return self.module.space

    @property
    def device(self) -> torch.device:
        return self.module.device

    def to(self, device: str | torch.device = "auto") -> Model:
        """Move the model (net and space) to a device: auto (CUDA when there is one), cpu, cuda:N."""
        from diffusion_lab.tasks import eval_device

        device = eval_device(OmegaConf.create({"eval": {"device": str(device)}}))
        self.module.to(device)
        self.space.to(device)
        return self

    def __repr__(self) -> str:
        objective = self.module.objective
        sampler = sampler_name(self.module.sampler)
        return (f"Model({self.checkpoint}: {type(self.module.net).__name__} "
                f"{sum(p.numel() for p in self.module.net.parameters()):,} parameters, step {self.step}, "
                f"{'EMA' if self.ema else 'raw'} weights, objective {objective.describe()}, schedule "
                f"{objective.schedule.describe()}, sampler {sampler}, space {self.space.describe()}, "
                f"{self.module.num_classes} classes, device {self.device})")

    # ---- choices, resolved the way the command line resolves them -------------------------------------------

    def sampler_config(self, sampler: str | None = None, steps: int | None = None, **options) -> DictConfig:
        """The sampler node: the checkpoint's own, or conf/sampler/<sampler>.yaml, with `steps` and options
        (eta, spacing, ...) set; its interpolations (ancestral's steps: ${timesteps}) resolve against the
        checkpoint's config."""
        cfg = copy.deepcopy(self.config)
        if sampler is not None:
            allowed = sorted(p.stem for p in (CONF_DIR / "sampler").glob("*.yaml"))
            if sampler not in allowed:
                raise ConfigError(f"sampler={sampler}: unknown choice; allowed: {', '.join(allowed)}")
            with open_dict(cfg):
                cfg.sampler = OmegaConf.load(CONF_DIR / "sampler" / f"{sampler}.yaml")
        options = {**({"steps": steps} if steps is not None else {}), **options}
        for key, value in options.items():
            if key.startswith("_") or key not in cfg.sampler:
                known = [k for k in cfg.sampler if not str(k).startswith("_")]
                raise ConfigError(f"sampler.{key}={value}: not an option of this sampler; options: {known}")
            cfg.sampler[key] = value
        OmegaConf.resolve(cfg)
        return cfg

    def make_sampler(self, sampler: str | None = None, steps: int | None = None, **options):
        """The sampler function (a partial over samplers.sample_*), checked by a dry run like the CLI's."""
        if sampler is None and steps is None and not options:
            return self.module.sampler
        fn = make(self.sampler_config(sampler, steps, **options), "sampler")
        check_sampler(fn, self.module.objective.schedule)
        return fn

    def make_guidance(self, guidance=None):
        """None: the checkpoint's own guidance (none if it trained without); a number: classifier-free guidance
        at that scale (1 = the conditional model); or a diffusion_lab.guidance object (ClassifierFree,
        ClassifierGuidance(ckpt, scale)). Checked against the net, schedule and space like guidance=... is."""
        if guidance is None:
            return self._own_guidance
        if isinstance(guidance, bool):
            raise ConfigError(f"guidance={guidance}: expected None, a classifier-free scale or a guidance object")
        if isinstance(guidance, (int, float)):
            try:
                guidance = ClassifierFree(float(guidance))
            except ValueError as exc:
                raise ConfigError(f"guidance.{exc}") from exc
        try:
            guidance.check(self.module.net, self.module.objective.schedule, self.space)
        except ValueError as exc:
            raise ConfigError(f"guidance: {exc}") from exc
        return guidance

    def labels(self, n: int, classes=None, unconditional: bool = False, guidance=None) -> Tensor | None:
        """Class requests -> labels, ordered as task=sample orders them: `classes` = "all", a list of indices or
        names (n per class, class by class; unconditional=True adds n rows labelled -1), or a tensor of labels
        (one per sample, -1 = unconditional). None: unconditional sampling."""
        if classes is None:
            return None
        if isinstance(classes, Tensor):
            labels = classes.long().flatten().cpu()
            if len(labels) != n:
                raise ConfigError(f"classes: {len(labels)} labels for n={n} samples (a label tensor has one per "
                                  "sample)")
        else:
            try:
                labels, _ = requested_labels(classes, self.class_names(classes), n, unconditional, key="classes")
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        if not self.module.num_classes and not isinstance(self.make_guidance(guidance), ClassifierGuidance):
            raise ConfigError(f"classes={classes if not isinstance(classes, Tensor) else 'tensor'}: the model is "
                              "unconditional (model.num_classes=0); class requests need a class-conditional model "
                              "or classifier guidance (guidance=ClassifierGuidance(ckpt, scale))")
        return labels

    def class_names(self, classes=None) -> list[str]:
        """The data's class names; read from the run's data only when a request names a class (a notebook
        without the data can still ask by index)."""
        count = int(OmegaConf.select(self.config, "data.num_classes", default=0) or 0)
        by_name = (isinstance(classes, str) and classes != "all") or (
            isinstance(classes, Sequence) and not isinstance(classes, str) and any(isinstance(c, str) for c in classes))
        if by_name:
            from diffusion_lab.preflight import setup_data

            setup_data(self.config, self._parts.datamodule)
        return list(getattr(self._parts.datamodule, "class_names", None) or [str(i) for i in range(count)])

    @contextmanager
    def _precision(self, precision: str | None):
        """Sampling autocast for one call: None keeps the checkpoint's (its training precision), else 32|bf16|16."""
        own = self.module.sample_precision
        if precision is not None and str(precision) not in PRECISIONS:
            raise ConfigError(f"precision={precision}: expected one of {', '.join(PRECISIONS)} "
                              "(None: the checkpoint's)")
        if precision is not None:
            self.module.sample_precision = sample_precision(OmegaConf.create({"eval": {"precision": str(precision)}}))
        try:
            yield
        finally:
            self.module.sample_precision = own

    # ---- the three things a user does with a model -------------------------------------------------------------

    def sample(self, n: int, sampler: str | None = None, steps: int | None = None, guidance=None, classes=None,
               unconditional: bool = False, seed: int = 0, batch_size: int | None = None,
               precision: str | None = None, return_labels: bool = False, **sampler_options):
        """n samples (n per class when `classes` is given) in data space, float32 on the CPU: points, or pixels in
        [-1, 1] (spaces.to_uint8 for uint8). Defaults are task=sample's: the checkpoint's sampler and guidance,
        seed 0, one batch. sampler: a conf/sampler choice (ancestral, ddim, euler, heun, dpmpp_2m, edm, ...);
        steps and sampler_options (eta=, spacing=, ...) as its sampler.* keys. return_labels: (x, labels)."""
        fn = self.make_sampler(sampler, steps, **sampler_options)
        guide = self.make_guidance(guidance)
        labels = self.labels(n, classes, unconditional, guidance)
        total = n if labels is None else len(labels)
        with self._precision(precision):
            x = self.module.sample_sharded(total, int(seed), cond=labels, sampler=fn, batch_size=batch_size or total,
                                           guidance=guide).float().cpu()
        return (x, labels) if return_labels else x

    @torch.no_grad()
    def denoise(self, xt: Tensor, t, classes=None, guidance=None) -> tuple[Tensor, Tensor]:
        """denoise(xt, t) -> (x0_hat, eps_hat) in model space, t in [0, 1] (0 data, 1 noise; a number or one per
        row): the denoiser every sampler calls, with the checkpoint's guidance by default. classes: a label, or
        one per row (-1 = unconditional)."""
        xt = xt.to(self.device)
        t = _per_row(t, len(xt), xt.dtype, xt.device)
        cond = None if classes is None else _per_row(classes, len(xt), torch.long, xt.device)
        guide = self.make_guidance(guidance)
        was_training = self.module.net.training
        self.module.net.eval()
        try:
            if guide is not None:
                guide.to(self.device)
                return guide.denoiser(self.module.net, self.module.objective, cond)(xt, t)
            return make_denoiser(self.module.net, self.module.objective, cond)(xt, t)
        finally:
            self.module.net.train(was_training)

    def evaluate(self, run_dir: str | Path, sampler: str | None = None, steps: int | None = None, guidance=None,
                 sampler_options: dict | None = None, **eval_options) -> dict:
        """task=sample on this model: draws, scores and writes into run_dir exactly what `task=sample ckpt=...`
        writes (samples.pt/.npz, plots, results.json) and returns results.json's dict. Defaults: the checkpoint's
        own eval settings; eval_options override them by their eval.* names (n_samples=, seed=, classes=,
        unconditional=, batch_size=, metrics=[fid, kid], judge=, reference=...)."""
        from diffusion_lab.evaluation import check_eval_inputs
        from diffusion_lab.tasks import sample_restored

        cfg = self.sampler_config(sampler, steps, **(sampler_options or {}))
        for key in ("use_ema", "device"):
            if key in eval_options:
                raise ConfigError(f"eval.{key}: set it when loading (diffusion_lab.load(ckpt, use_ema=..., "
                                  "device=...)) or with model.to(device)")
        with open_dict(cfg):
            cfg.ckpt, cfg.sampler_source, cfg.guidance = str(self.checkpoint), "config", None
            for key, value in eval_options.items():
                if key not in cfg.eval:
                    raise ConfigError(f"eval.{key}={value}: no such key; eval keys: {list(cfg.eval)}")
                cfg.eval[key] = value
            cfg.eval.device = str(self.device)
        check_eval_inputs(cfg.eval)
        own = self.module.guidance, self.module.sample_precision
        self.module.guidance = self.make_guidance(guidance)  # cfg.guidance=None: sample_restored keeps this one
        try:
            return sample_restored(cfg, Path(run_dir), self._parts, self.config, self._ckpt, self.ema)
        finally:
            self.module.guidance, self.module.sample_precision = own


def _per_row(value, n: int, dtype: torch.dtype, device) -> Tensor:
    """A number (the same for every row) or one value per row -> a (n,) tensor."""
    value = torch.as_tensor(value, dtype=dtype, device=device)
    return value.expand(n) if value.ndim == 0 else value
