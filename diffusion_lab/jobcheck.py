"""Sweep jobs checked before any launches (hydra_plugins/diffusion_lab_sweeper, `hydra/sweeper=cases`)."""

from __future__ import annotations

import copy

from omegaconf import DictConfig, OmegaConf, open_dict


def check_job(cfg: DictConfig, overrides: list[str], cache: dict | None = None) -> str | None:
    """Why a sweep job would fail on its config (None: it would not), checked before it launches
    (hydra_plugins/diffusion_lab_sweeper): the checks run_task makes first (allowed targets, the config schema)
    and, for task=sample/evaluate over a checkpoint, the eval inputs and the job's sampler against the
    checkpoint's own schedule (ancestral at 700 steps over a T=500 checkpoint). `cache`: checkpoint path ->
    its stored config, so a sweep over one checkpoint reads it once."""
    from hydra.core.hydra_config import HydraConfig

    from diffusion_lab.build import ConfigError, diffusion_config, load_checkpoint, make
    from diffusion_lab.evaluation import check_eval_inputs
    from diffusion_lab.safety import allow_user_targets
    from diffusion_lab.tasks import _sampler_override
    from diffusion_lab.validate import validate

    hydra_config = HydraConfig.instance()
    previous = hydra_config.cfg
    cache = {} if cache is None else cache
    try:
        if "hydra" in cfg:
            hydra_config.set_config(cfg)  # ${hydra:runtime.choices.experiment} etc. resolve as in the job
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            cfg.pop("hydra", None)  # what the job's function receives; its run dir does not exist yet
            cfg.run_dir = "<sweep job dir>"
        allow_user_targets(cfg.get("allow_targets"))
        validate(cfg)
        target = str(OmegaConf.select(cfg, "task._target_", default=""))
        if target.endswith((".sample", ".evaluate")) and not cfg.get("ckpt") and not cfg.get("samples"):
            raise ConfigError("ckpt=null: task=sample/evaluate needs ckpt=<path to a .ckpt>")
        if target.endswith((".sample", ".evaluate")) and cfg.get("ckpt") and not cfg.get("samples"):
            check_eval_inputs(cfg.eval)
            path = str(cfg.ckpt)
            if path not in cache:  # refused here as task=sample would refuse it, before any job starts
                cache[path] = diffusion_config(load_checkpoint(path), path)
            saved = cache[path]
            _sampler_override(cfg, saved, make(saved, "schedule"), overrides)  # built and dry-run on that schedule
    except ConfigError as exc:
        return str(exc)
    finally:
        hydra_config.cfg = previous
    return None
