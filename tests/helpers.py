"""Test helpers: compose configs in-process and run run.py as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# Tiny, quiet settings for runs inside the test suite.
FAST = ["callbacks=minimal", "trainer.enable_model_summary=false", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=5"]


def compose_cfg(overrides: list[str], run_dir: Path | None = None) -> DictConfig:
    """Compose conf/config.yaml in-process with `name` and `run_dir` filled (no Hydra runtime needed)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.name = "test"
        cfg.run_dir = str(run_dir or "/tmp/diffusion_lab_test")
    return cfg


def run_cli(args: list[str], cwd: Path = REPO, timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture
def float64():
    """Closed-form comparisons: no fp32 noise (the previous default dtype is restored afterwards)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
