"""Command-line glue for run.py: early one-line config errors and the task dispatcher."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from diffusion_lab.build import ConfigError

log = logging.getLogger("diffusion_lab")


def _fail(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def check_group_choices(conf_dir: Path, argv: list[str]) -> None:
    """Reject `group=choice` overrides whose YAML does not exist, naming the allowed choices."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        group = conf_dir / key
        if "." in key or key.startswith("hydra") or not group.is_dir():
            continue
        allowed = sorted(p.stem for p in group.glob("*.yaml"))
        for choice in _choices(value):
            if choice not in allowed and choice != "null":
                _fail(f"{key}={choice}: unknown choice; allowed: {', '.join(allowed)}")


def _choices(value: str) -> list[str]:
    """Choices in an override value: `a`, sweeps `a,b`, `choice(a,b)`."""
    value = value.strip()
    if value.startswith(("choice(", "range(", "glob(", "interval(")):
        value = value[value.index("(") + 1: -1]
    return [v.strip().strip("'\"") for v in value.split(",") if v.strip()]


def run_task(cfg: DictConfig):
    """Dispatch to cfg.task; config errors end as one line (exit 2) in single runs, a failed job in sweeps."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        task = instantiate(cfg.task)
        results = task(cfg, run_dir)
    except ConfigError as exc:
        if multirun:
            raise
        _fail(str(exc))
    metrics = results.get("metrics", {})
    log.info("results: %s -> %s", {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)},
             run_dir / "results.json")
    print(f"results.json: {run_dir / 'results.json'}")
    for key, value in metrics.items():
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    metric = cfg.get("sweep_metric")
    return metrics.get(metric) if metric else None
