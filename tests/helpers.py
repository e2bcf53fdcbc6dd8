"""Test helpers: compose configs in-process and run run.py as a subprocess."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def run_cli(args: list[str], cwd: Path = REPO, timeout: int | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """run.py as a user runs it. No wall-clock limit by default: a test must not fail because the machine is
    busy (a hang is still visible as a test that does not end)."""
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


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX file (magic 0x0000080N: uint8, N dims, big-endian sizes), gzipped like the MNIST originals."""
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_autoencoder_ckpt(path: Path, seed: int = 0, experiment: str = "mnist_autoencoder") -> Path:
    """A task=train_autoencoder checkpoint of a small, randomly initialised KL-autoencoder of `experiment`'s
    layout at width 8 (mnist_autoencoder: 1x32x32 -> 4x8x8; imagenet100_autoencoder: 3x128x128 -> 3x32x32):
    the stored config and `net.` weights a trained one has, in a second."""
    from diffusion_lab.build import make, resolved

    cfg = compose_cfg([f"experiment={experiment}", "autoencoder.ch=8", "autoencoder.norm_groups=4",
                       "data.root=unused"], path.parent)
    torch.manual_seed(seed)
    net = make(cfg, "autoencoder")
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "config": resolved(cfg),
                "global_step": 0}, path)
    return path
