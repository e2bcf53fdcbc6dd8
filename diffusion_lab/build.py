"""The only place that wires objects together from a composed config.

Reload = build(saved_config) + load_state_dict. Constructor errors are re-raised as one-line
ConfigErrors that name the config key ("schedule.T=-3: expected an integer >= 1").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffusion_lab.checkpoint_io import AtomicCheckpointIO
from diffusion_lab.errors import ConfigError
from diffusion_lab.lit import DiffusionModule
from diffusion_lab.safety import check_stored_config

__all__ = ["ConfigError", "build", "load_checkpoint", "load_task_net", "make", "make_space", "module_state",
           "restore"]

TRAIN_TARGET = "diffusion_lab.tasks.train"


def _root_cause(exc: BaseException) -> BaseException:
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def make(cfg: DictConfig, key: str, optional: bool = False, **kwargs):
    """instantiate(cfg.<key>) with constructor errors turned into ConfigError('<key>.<arg>=...').

    An optional component (LR schedule, a callback, the logger) that a choice set to null and an
    experiment then tuned (`lr_scheduler=constant` + the experiment's `lr_scheduler.warmup_steps`)
    is left out: the node has settings but no `_target_`.
    """
    node = OmegaConf.select(cfg, key)
    if node is None:
        return None
    if isinstance(node, DictConfig) and "_target_" not in node:
        if optional:
            return None
        raise ConfigError(f"{key}: no _target_ (got {OmegaConf.to_container(node)}); was it set to null "
                          "and then partly overridden?")
    try:
        return instantiate(node, **kwargs)
    except OmegaConfBaseException as exc:  # e.g. model.channels=${data.channels} on points data
        msg = next(iter(str(exc).strip().splitlines()), type(exc).__name__)
        raise ConfigError(f"{key}: {msg} (does this {key} fit the data and the other choices?)") from exc
    except InstantiationException as exc:
        cause = _root_cause(exc)
        msg = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        if isinstance(cause, (ValueError, TypeError)) and re.match(r"^\w+=", msg):
            raise ConfigError(f"{key}.{msg}") from cause
        raise ConfigError(f"{key}: {msg}") from cause


def check_sampler(sampler, schedule, key: str = "sampler") -> None:
    """Validate sampler arguments up front (steps, eta, ...) by a dry run on one scalar point."""
    dummy = lambda x, t: (torch.zeros_like(x), x)
    try:
        sampler(dummy, schedule, torch.zeros(1, 1), generator=torch.Generator().manual_seed(0))
    except (ValueError, TypeError) as exc:
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"{key}.{msg}" if re.match(r"^\w+=", msg) else f"{key}: {msg}") from exc


@dataclass
class Parts:
    """Everything a run needs, built from one config."""

    datamodule: L.LightningDataModule
    module: DiffusionModule

    @property
    def space(self):
        return self.module.space


def resolved(cfg: DictConfig) -> dict:
    """Plain, fully resolved dict of the run config (stored in checkpoints and the run dir)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def build(cfg: DictConfig) -> Parts:
    """Data, space, schedule, objective, net, sampler and optimizer -> a DiffusionModule and its DataModule."""
    datamodule = make(cfg, "data")
    space = make_space(cfg)
    schedule = make(cfg, "schedule")
    objective = make(cfg, "objective", schedule=schedule)
    net = make(cfg, "model")
    sampler = make(cfg, "sampler")
    check_sampler(sampler, schedule)
    guidance = make_guidance(cfg, net, schedule, space)
    try:
        module = DiffusionModule(
            net=net, objective=objective, optimizer=make(cfg, "optimizer"), sampler=sampler,
            space=space, lr_scheduler=make(cfg, "lr_scheduler", optional=True),
            config=resolved(cfg), guidance=guidance, sample_precision=sample_precision(cfg),
            **(cfg.get("train") or {}),
        )
    except (ValueError, TypeError) as exc:  # the train.* options
        msg = next(iter(str(exc).strip().splitlines()), type(exc).__name__)
        raise ConfigError(f"train.{msg}" if re.match(r"^\w+=", msg) else f"train: {msg}") from exc
    return Parts(datamodule=datamodule, module=module)


def make_space(cfg: DictConfig):
    """cfg.space (each dataset config names its natural one: pixels or points), frozen and built once."""
    if OmegaConf.select(cfg, "space") is None:
        raise ConfigError("space: missing; the data config names its space (pixels or points), or choose "
                          "space=pixels|points|autoencoder|diffusers_vae")
    return make(cfg, "space")


def make_guidance(cfg: DictConfig, net, schedule, space=None):
    """cfg.guidance (null, cfg or classifier), checked against the net, schedule and space it will guide."""
    guidance = make(cfg, "guidance", optional=True)
    if guidance is not None:
        try:
            guidance.check(net, schedule, space)
        except ValueError as exc:
            raise ConfigError(f"guidance: {exc}") from exc
    return guidance


def sample_precision(cfg: DictConfig) -> str | None:
    """Autocast dtype for sampling: the training precision's ("bf16-mixed" -> "bf16"), else none (fp32)."""
    precision = str(OmegaConf.select(cfg, "eval.precision", default="auto") or "32")
    if precision == "auto":
        precision = str(OmegaConf.select(cfg, "trainer.precision", default="32"))
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    return None


def build_trainer(cfg: DictConfig, run_dir: Path, exclude: tuple[type, ...] = ()) -> L.Trainer:
    """Trainer with the configured callbacks (null entries and `exclude` types skipped), the in-process History
    (loss and throughput for report.md whatever the logger) and the logger.

    The progress bar and model summary Lightning would add by default are replaced by ours (callbacks.py: one
    line, epochs counted right; real FLOPs); trainer.enable_progress_bar=false drops a configured bar instead
    of failing (Lightning refuses the flag next to a bar callback), so a resume may switch it off."""
    from lightning.pytorch.callbacks import ModelSummary as AnySummary
    from lightning.pytorch.callbacks import ProgressBar as AnyBar

    from diffusion_lab.callbacks import History, ModelSummary, ProgressBar
    from diffusion_lab.console import quiet_libraries

    quiet_libraries()
    callbacks = [make(cfg, f"callbacks.{name}", optional=True) for name in (cfg.get("callbacks") or {})]
    callbacks = [History()] + [c for c in callbacks if c is not None and not isinstance(c, exclude)]
    if not OmegaConf.select(cfg, "trainer.enable_progress_bar", default=True):
        callbacks = [c for c in callbacks if not isinstance(c, AnyBar)]
    elif not any(isinstance(c, AnyBar) for c in callbacks):
        callbacks.append(ProgressBar())
    if OmegaConf.select(cfg, "trainer.enable_model_summary", default=True) and not any(
            isinstance(c, AnySummary) for c in callbacks):
        callbacks.append(ModelSummary())
    logger = make(cfg, "logger", optional=True) or False
    return make(cfg, "trainer", callbacks=callbacks, logger=logger, enable_model_summary=False,
                default_root_dir=str(run_dir), plugins=[AtomicCheckpointIO()])


def load_checkpoint(path: str | Path, key: str = "ckpt") -> dict:
    """torch.load with weights_only=True, then the stored config checked against the allow-list of targets
    (safety.py) before any caller can instantiate it; one-line errors that name `key` (the config key the
    path came from: ckpt, ckpt_path, guidance.ckpt, eval.judge)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}={path}: file not found (expected a .ckpt written by a training run)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / truncated / empty / not a checkpoint / a pickle asking for code
        first = next(iter(str(exc).strip().splitlines()), "")[:200]
        raise ConfigError(f"{key}={path}: cannot be read as a checkpoint ({type(exc).__name__}"
                          f"{': ' + first if first else ''})") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or not isinstance(ckpt.get("config"), dict):
        raise ConfigError(f"{key}={path}: not a diffusion_lab checkpoint (missing state_dict or config)")
    check_stored_config(ckpt["config"], f"{key}={path}")
    return ckpt


def load_task_net(path: str | Path, key: str, task_target: str, node: str, what: str,
                  use_ema: bool = True) -> tuple[torch.nn.Module, DictConfig, dict]:
    """The `node` net of a checkpoint written by `task_target` (a classifier, an autoencoder): refuses other
    tasks' checkpoints in one line, loads its `net.` weights (EMA when there are) -> (frozen net in eval mode on
    the CPU, the stored config, the checkpoint)."""
    ckpt = load_checkpoint(path, key=key)
    cfg = OmegaConf.create(ckpt["config"])
    target = OmegaConf.select(cfg, "task._target_")
    if target != task_target:
        raise ConfigError(f"{key}={path}: not {what} checkpoint (written by task {target}); expected one from "
                          f"task={task_target.rsplit('.', 1)[-1]}")
    net = make(cfg, node)
    state, _ = module_state(ckpt, use_ema)
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    return net.eval().requires_grad_(False), cfg, ckpt


def module_state(ckpt: dict, use_ema: bool) -> tuple[dict, bool]:
    """The module weights to load: EMA ("state_dict" under the EMA callback) or the raw ones."""
    has_ema = "current_model_state" in ckpt
    if use_ema or not has_ema:
        return ckpt["state_dict"], has_ema
    return ckpt["current_model_state"], False


def diffusion_config(ckpt: dict, path: str | Path, key: str = "ckpt") -> DictConfig:
    """The stored config of a task=train checkpoint; any other checkpoint (a classifier, an autoencoder) is refused
    in one line. Shared by restore and the sweep's up-front job check (jobcheck.py)."""
    saved = OmegaConf.create(ckpt["config"])
    kind = OmegaConf.select(saved, "task._target_", default=None)
    if kind != TRAIN_TARGET:
        raise ConfigError(f"{key}={path}: written by task {kind}, not a diffusion model; task=sample/evaluate "
                          "need a checkpoint of task=train")
    return saved


def restore(path: str | Path, use_ema: bool = True, key: str = "ckpt") -> tuple[Parts, DictConfig, dict, bool]:
    """A task=train checkpoint -> (its parts with the weights loaded, EMA by default, and the space's stored state;
    the saved config; the checkpoint; whether EMA weights were used). Reload = build(saved config) +
    load_state_dict; the one way task=sample/evaluate, diffusion_lab.load and DiffusionModule.load_from_checkpoint
    bring a model back (the stored config passed load_checkpoint's allow-list before anything is built)."""
    from diffusion_lab.preflight import check_weights  # preflight sits above build: import where used

    ckpt = load_checkpoint(path, key=key)
    saved = diffusion_config(ckpt, path, key)
    parts = build(saved)
    state, used_ema = module_state(ckpt, use_ema)
    check_weights(state, parts.module.state_dict(), f"{key}={path}")
    parts.module.load_state_dict(state)
    parts.module.space.load_state(ckpt.get("space") or {}, key=f"{key}={path}")  # scaling; autoencoder sha256
    return parts, saved, ckpt, used_ema
