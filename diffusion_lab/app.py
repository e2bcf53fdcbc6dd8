"""The command line, one Hydra app for every way of starting it: `diffusion-lab` (the console script an install
creates), `python -m diffusion_lab` and the checkout's `python run.py` all call `main` here, so they compose the
same config tree, accept the same overrides and fail with the same one-line errors and exit codes."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from diffusion_lab import CONF_DIR
from diffusion_lab.cli import check_composition, check_group_choices, check_output_dirs, run_task


# An absolute config_path: Hydra then reads conf/ from wherever the package found it (inside an installed
# package or the checkout, diffusion_lab.CONF_DIR), not relative to the file or module that calls it.
@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    """Run cfg.task; returns the sweep metric (cfg.sweep_metric) for Hydra sweepers."""
    return run_task(cfg)


def main() -> None:
    """`diffusion-lab [experiment=NAME] [key=value ...]`, `-m` for sweeps: early one-line errors, then Hydra."""
    check_group_choices(CONF_DIR, sys.argv[1:])  # one-line error for unknown choices, before Hydra starts
    check_composition(CONF_DIR, sys.argv[1:])  # ... and for unknown keys or malformed overrides
    check_output_dirs(sys.argv[1:])  # ... and for output dirs that cannot be created
    hydra_main()
