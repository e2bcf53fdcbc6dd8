"""diffusion-lab entry point: `python run.py [experiment=NAME] [key=value ...]`, `-m` for sweeps."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from diffusion_lab.cli import check_composition, check_group_choices, check_output_dirs, run_task

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run cfg.task; returns the sweep metric (cfg.sweep_metric) for Hydra sweepers."""
    return run_task(cfg)


if __name__ == "__main__":
    check_group_choices(CONF, sys.argv[1:])  # one-line error for unknown choices, before Hydra starts
    check_composition(CONF, sys.argv[1:])  # ... and for unknown keys or malformed overrides
    check_output_dirs(sys.argv[1:])  # ... and for output dirs that cannot be created
    main()
