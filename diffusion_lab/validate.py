"""Up-front validation: every config value a run reads later is checked here, before the run dir is claimed,
any data is read or any step is trained, so a typo costs a second instead of a training run.

Constructor arguments (schedule.T, sampler.steps, model widths, ...) are checked by the constructors
themselves when build() runs, which also happens before training; this table covers the values that are
only read later (evaluation, trainer limits, optimizer settings, paths) and the ones whose constructor
errors are not one line (Lightning's Trainer, torch.optim). Each failure is a ConfigError
`<key>=<value>: <what was expected>`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, OmegaConfBaseException

from diffusion_lab.errors import ConfigError

_MISSING = object()


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def int_at_least(lo: int) -> tuple[Callable, str]:
    return (lambda v: _int(v) and v >= lo), f"expected an integer >= {lo}"


def positive_number() -> tuple[Callable, str]:
    return (lambda v: _num(v) and v > 0), "expected a finite number > 0"


def nonneg_number() -> tuple[Callable, str]:
    return (lambda v: _num(v) and v >= 0), "expected a finite number >= 0"


def optional(check: tuple[Callable, str]) -> tuple[Callable, str]:
    fn, text = check
    return (lambda v: v is None or fn(v)), f"{text} (or null)"


def one_of(*values) -> tuple[Callable, str]:
    return (lambda v: v in values), f"expected one of {', '.join(map(str, values))}"


BOOL = ((lambda v: isinstance(v, bool)), "expected true or false")
SEED = ((lambda v: _int(v) and 0 <= v < 2**32), "expected an integer in [0, 2**32)")
DEVICE = ((lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v) is not None),
          "expected auto, cpu, cuda or cuda:N")
MAX_STEPS = ((lambda v: _int(v) and (v >= 1 or v == -1)), "expected an integer >= 1 (or -1: use trainer.max_epochs)")
MAX_EPOCHS = ((lambda v: v is None or (_int(v) and (v >= 1 or v == -1))), "expected an integer >= 1 or -1")

# key -> check; a key absent from the composed config is skipped (not every task has every group).
SCHEMA: dict[str, tuple[Callable, str]] = {
    "seed": SEED,
    "timesteps": int_at_least(1),
    "auto_resume": BOOL,
    "force": BOOL,
    "sampler_source": one_of("auto", "config"),
    "eval.n_samples": int_at_least(1),
    "eval.seed": SEED,
    "eval.batch_size": optional(int_at_least(1)),
    "eval.use_ema": BOOL,
    "eval.unconditional": BOOL,
    "eval.precision": one_of("auto", "32", "32-true", "bf16", "bf16-mixed", "16", "16-mixed", 32, 16),
    "eval.device": DEVICE,
    "eval.reference.n": optional(int_at_least(1)),
    "eval.fidelity.batch_size": int_at_least(1),
    "eval.fidelity.kid_subsets": int_at_least(1),
    "eval.fidelity.kid_subset_size": int_at_least(2),
    "trainer.max_steps": MAX_STEPS,
    "trainer.max_epochs": MAX_EPOCHS,
    "trainer.log_every_n_steps": int_at_least(1),
    "trainer.accumulate_grad_batches": int_at_least(1),
    # Lightning's own parser raises deep in Trainer(); "DD:HH:MM:SS" is the form it documents for configs
    "trainer.max_time": ((lambda v: v is None or (isinstance(v, str) and re.fullmatch(r"\d+:\d\d:\d\d:\d\d", v)
                                                   and v != "00:00:00:00")),
                         "expected null or a positive wall-clock budget DD:HH:MM:SS, e.g. 00:00:08:00"),
    "trainer.gradient_clip_val": optional(positive_number()),
    "optimizer.lr": positive_number(),
    "optimizer.weight_decay": nonneg_number(),
    "lr_scheduler.warmup_steps": int_at_least(0),
    "data.batch_size": int_at_least(1),
    "train.nonfinite": one_of("raise", "skip"),
    "train.nonfinite_check": one_of("auto", "step", "deferred"),
    "train.max_consecutive_skips": int_at_least(1),
    "train.nonfinite_check_every": int_at_least(1),
    "data.cache_latents": BOOL,
    "space.scaling": one_of("measured", "fixed"),
    "space.stats_images": optional(int_at_least(2)),
    "space.encode_batch_size": int_at_least(1),
    "task.lpips_weight": nonneg_number(),  # task=train_autoencoder
    "task.kl_weight": nonneg_number(),
    "task.disc_start": optional(int_at_least(0)),
    "task.disc_weight": nonneg_number(),
    "task.disc_ch": int_at_least(1),
    "task.disc_layers": int_at_least(1),
    "task.eval_n": optional(int_at_least(2)),
    "task.n": optional(int_at_least(1)),  # task=export
    "task.eval_batch_size": int_at_least(1),
    "task.rfid": BOOL,
    "task.rfid_n": optional(int_at_least(2)),
    "lpips.net": one_of("alex", "vgg"),
}

# The latent spaces' inputs, checked before the config is resolved: the latent shape interpolations
# (${dl_latent_shape:...}) read them.
SPACE_INPUTS = {
    "space.ckpt": ("an autoencoder .ckpt written by task=train_autoencoder", lambda p: p.is_file()),
    "space.path": ("a diffusers AutoencoderKL folder (config.json + safetensors)",
                   lambda p: (p / "config.json").is_file()),
}

# Input files: key -> what the file should be. Checked for existence here; their content is checked by
# their readers (load_checkpoint, read_samples, the data modules) before any work.
FILES = {
    "ckpt": "a .ckpt written by a training run",
    "ckpt_path": "a .ckpt to resume from",
    "samples": "a samples.pt or samples.npz",
    "eval.judge": "a classifier .ckpt written by task=train_classifier task.noisy=false",
    "guidance.ckpt": "a classifier .ckpt written by task=train_classifier",
    "data.path": "a points file (.pt/.npz/.npy/.csv/.txt)",
    "eval.fidelity.weights": "Inception weights (.pth) for torch-fidelity",
}


def _show(value) -> str:
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        return str(OmegaConf.to_container(value))
    return str(value)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first bad value (table order), naming the key and what was expected."""
    for key, (what, present) in SPACE_INPUTS.items():
        node, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, node)
        if not isinstance(parent, DictConfig) or leaf not in parent.keys():  # `in` is False for ??? values
            continue
        if OmegaConf.is_missing(OmegaConf.select(cfg, node), leaf):
            raise ConfigError(f"{key}: missing; expected {what} ({key}=<path>)")
        try:
            value = OmegaConf.select(cfg, key)
        except InterpolationToMissingValueError as exc:  # space.ckpt: ${autoencoder_ckpt} of the ImageNet-100 rows
            source = str(OmegaConf.to_container(parent, resolve=False)[leaf]).removeprefix("${").removesuffix("}")
            raise ConfigError(f"{source}: missing; expected {what} ({source}=<path>, read by {key})") from exc
        if not isinstance(value, str) or not present(Path(value)):
            raise ConfigError(f"{key}={_show(value)}: not found (expected {what})")
    try:  # interpolations that cannot resolve: a model asking for ${data.channels} on points data
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        msg = next(iter(str(exc).strip().splitlines()), type(exc).__name__)
        raise ConfigError(f"{key}: {msg} (do the chosen groups fit together?)") from exc
    for key, (check, expected) in SCHEMA.items():
        value = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
        if value is _MISSING:
            continue
        if not check(value):
            raise ConfigError(f"{key}={_show(value)}: {expected}")
    steps, epochs = OmegaConf.select(cfg, "trainer.max_steps"), OmegaConf.select(cfg, "trainer.max_epochs")
    budget = OmegaConf.select(cfg, "trainer.max_time", default=None)
    if steps == -1 and epochs in (None, -1) and budget is None and OmegaConf.select(cfg, "trainer") is not None:
        raise ConfigError("trainer.max_steps=-1: with trainer.max_epochs=-1 and no trainer.max_time training "
                          "would never end; set one")
    check_extras(cfg)
    for key, what in FILES.items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if value in (None, ""):
            continue
        if not isinstance(value, str):
            raise ConfigError(f"{key}={_show(value)}: expected a path to {what}")
        if not Path(value).is_file():
            raise ConfigError(f"{key}={value}: file not found (expected {what})")
    classes = OmegaConf.select(cfg, "eval.classes", default=None)
    judge = OmegaConf.select(cfg, "eval.judge", default=None)
    if judge and classes is None:
        raise ConfigError(f"eval.judge={judge}: judging needs class requests (eval.classes=all or a list)")


# choices whose package is an optional extra (pyproject [project.optional-dependencies]): target -> (key, package)
EXTRAS = {"lightning.pytorch.loggers.WandbLogger": ("logger", "wandb"),
          "lightning.pytorch.loggers.MLFlowLogger": ("logger", "mlflow")}


def check_extras(cfg: DictConfig) -> None:
    """A chosen optional extra must be installed: one line naming the choice and the pip command, before any
    work (Lightning would fail at the first log call, after the data and model were built)."""
    import importlib.util

    for target, (key, package) in EXTRAS.items():
        if OmegaConf.select(cfg, f"{key}._target_", default=None) == target and not importlib.util.find_spec(package):
            raise ConfigError(f"{key}={package}: the {package} package is not installed (an optional extra: "
                              f"pip install -e '.[{package}]')")
