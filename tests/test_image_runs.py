"""Image experiments end to end (debug=fast), overfit sanity, TensorBoard read-back, non-finite loss."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import REPO, compose_cfg, run_cli
from test_image_data import write_celeba_export, write_cifar, write_idx

from diffusion_lab.build import build, build_trainer
from diffusion_lab.lit import NonFiniteLossError

SHARED_MNIST = REPO.parent / "shared" / "data"
QUIET = ["callbacks.progress=null"]
COVERED = {"mnist_ddpm", "cifar10_ddpm", "celeba64_ddpm", "mnist_denoiser"}  # experiments run below


def mnist_root(tmp_path: Path) -> Path:
    """The real MNIST files when they are beside the repo, else a small IDX fixture."""
    if (SHARED_MNIST / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file():
        return SHARED_MNIST
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    rng = np.random.default_rng(0)
    for split, n in (("train", 256), ("t10k", 1000)):
        write_idx(raw / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(raw / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    return tmp_path / "mnist"


def data_overrides(experiment: str, tmp_path: Path) -> list[str]:
    if experiment.startswith("mnist"):
        return [f"data.root={mnist_root(tmp_path)}", "data.download=false"]
    if experiment.startswith("cifar10"):
        write_cifar(tmp_path / "cifar")
        return [f"data.root={tmp_path / 'cifar'}", "data.download=false"]
    write_celeba_export(tmp_path / "celeba")
    return [f"data.root={tmp_path / 'celeba'}", "data.download=false"]


def scalars_and_images(run_dir: Path) -> tuple[dict, set]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = {}, set()
    for path in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
        images |= set(acc.Tags()["images"])
    return scalars, images


# celeba64 (32 s: the 64 px U-Net) and cifar10 (19 s: Ho et al.'s 35.7M U-Net) run in make test-slow; their data
# formats are read in test_image_data.py, CIFAR-10 trains and samples in test_guidance.py's CFG-by-override run,
# and the same training/sampling path runs here with mnist
@pytest.mark.parametrize("experiment", ["mnist_ddpm", pytest.param("cifar10_ddpm", marks=pytest.mark.slow),
                                        pytest.param("celeba64_ddpm", marks=pytest.mark.slow)])
def test_image_experiment_debug_fast(experiment, tmp_path):
    run = tmp_path / "run"
    proc = run_cli([f"experiment={experiment}", "debug=fast", *QUIET, *data_overrides(experiment, tmp_path),
                    f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((run / "results.json").read_text())
    assert res["protocol"]["step"] == 4 and res["protocol"]["ema"] is True
    assert res["metrics"]["n_images"] == 4
    for name in ("samples.png", "samples.npz", "trajectory.png", "sampling.gif", "loss_curve.png",
                 "monitor/step_0000002.png", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    assert len(list((run / "samples").glob("*.png"))) == 4
    if experiment == "cifar10_ddpm":  # the model summary at start prints Ho et al.'s 35.7M (Lightning's log: stderr)
        assert "35.7 M" in proc.stdout + proc.stderr


def test_tensorboard_has_the_documented_scalars_and_images(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(["experiment=mnist_ddpm", "debug=fast", *QUIET, *data_overrides("mnist", tmp_path),
                    f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars, images = scalars_and_images(run)
    for tag in ("train/loss", "train/loss_t_q1", "train/loss_t_q2", "train/loss_t_q3", "train/loss_t_q4",
                "train/grad_norm", "train/samples_per_sec", "lr-Adam"):
        assert tag in scalars and all(np.isfinite(scalars[tag])), tag
    assert {"samples/monitor", "samples/final", "samples/trajectory"} <= images


@pytest.mark.slow  # ~2 min on 2 cores: kept out of the default suite's 15-minute budget (make test-slow)
def test_mnist_denoiser_debug_fast_writes_the_cs180_figures(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(["experiment=mnist_denoiser", "debug=fast", *QUIET, *data_overrides("mnist", tmp_path),
                    f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("noising_process.png", "ood_sigma_sweep.png", "denoised_epoch_001.png", "loss_curve.png"):
        assert (run / name).is_file(), name
    mse = json.loads((run / "results.json").read_text())["metrics"]
    assert set(mse) == {f"test_mse_sigma_{s}" for s in (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)}


@pytest.mark.slow  # ~1 min of training: make test-slow
def test_debug_overfit_drives_mnist_unet_loss_to_zero(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(["experiment=mnist_ddpm", "debug=overfit", *QUIET, *data_overrides("mnist", tmp_path),
                    "trainer.max_steps=200", "data.batch_size=16", "trainer.precision=32-true",
                    "train.channels_last=false", f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = scalars_and_images(run)[0]["train/loss"]
    assert losses[-1] < 0.01 and losses[-1] < losses[0] / 50, losses


class _PoisonAt(L.Callback):
    """Sets one weight to NaN after the given step, so the next loss is non-finite."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.net.parameters()).view(-1)[0] = float("nan")


@pytest.mark.parametrize("check, message", [("auto", "at step 5"), ("deferred", "at step 5 ")])
def test_nonfinite_loss_stops_naming_the_step_and_keeps_good_checkpoint(tmp_path, check, message):
    """auto on the CPU checks every step. deferred (the sync-free GPU path, forced here on the CPU): the
    fused step skips the poisoned updates on the device, and the checkpoint after the bad step is refused."""
    cfg = compose_cfg(["callbacks=minimal", "callbacks.checkpoint.every_n_train_steps=2", "trainer.max_steps=10",
                       "data.batch_size=64", "callbacks.ema=null", "trainer.enable_progress_bar=false",
                       "trainer.enable_model_summary=false", f"train.nonfinite_check={check}"], tmp_path)
    parts = build(cfg)
    trainer = build_trainer(cfg, tmp_path)
    trainer.callbacks.append(_PoisonAt(step=5))
    with pytest.raises(NonFiniteLossError, match=message):
        trainer.fit(parts.module, datamodule=parts.datamodule)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


class _NanLossAt(L.Callback):
    """Makes the batch of the given steps NaN, so their loss (not the weights) is non-finite."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            batch["x"] = batch["x"] * float("nan")


def test_deferred_skip_leaves_the_weights_and_the_adam_step_count_untouched(tmp_path):
    cfg = compose_cfg(["callbacks=minimal", "callbacks.checkpoint=null", "trainer.max_steps=8", "data.batch_size=64",
                       "callbacks.ema=null", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                       "train.nonfinite=skip", "train.nonfinite_check=deferred", "logger=csv",
                       "trainer.log_every_n_steps=4", "trainer.gradient_clip_val=1.0"], tmp_path)
    parts = build(cfg)
    trainer = build_trainer(cfg, tmp_path)
    trainer.callbacks.append(_NanLossAt({2, 3, 6}))
    trainer.fit(parts.module, datamodule=parts.datamodule)
    assert all(torch.isfinite(p).all() for p in parts.module.net.parameters())
    steps = {int(state["step"]) for state in trainer.optimizers[0].state.values()}
    assert steps == {8 - 3}  # Adam's own step counter rolled back for the 3 skipped updates
    import csv

    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert sum(float(r["train/skipped_nonfinite"]) for r in rows if r.get("train/skipped_nonfinite")) == 3


@pytest.mark.parametrize("check", ["step", "deferred"])
def test_skip_warns_and_stops_after_max_consecutive_skips(tmp_path, check, caplog):
    """nonfinite=skip must not train on silently when every step is bad: a warning at the first skip, a
    one-line stop after train.max_consecutive_skips bad steps in a row (an isolated bad step is fine)."""
    cfg = compose_cfg(["callbacks=minimal", "callbacks.checkpoint=null", "trainer.max_steps=40", "data.batch_size=64",
                       "callbacks.ema=null", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                       "train.nonfinite=skip", f"train.nonfinite_check={check}", "train.max_consecutive_skips=5",
                       "train.nonfinite_check_every=1", "logger=none"], tmp_path)
    parts = build(cfg)
    trainer = build_trainer(cfg, tmp_path)
    trainer.callbacks.append(_NanLossAt({2, *range(10, 100)}))  # one isolated bad step, then a diverged run
    with caplog.at_level("WARNING", logger="diffusion_lab"), \
            pytest.raises(NonFiniteLossError, match="max_consecutive_skips=5: 5 non-finite steps in a row"):
        trainer.fit(parts.module, datamodule=parts.datamodule)
    assert any("step skipped" in r.getMessage() for r in caplog.records)


def test_deferred_check_stops_within_nonfinite_check_every(tmp_path):
    """With logging steps far apart, the deferred check still reads its flag every N steps."""
    cfg = compose_cfg(["callbacks=minimal", "callbacks.checkpoint=null", "trainer.max_steps=60", "data.batch_size=64",
                       "callbacks.ema=null", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                       "train.nonfinite_check=deferred", "train.nonfinite_check_every=4",
                       "trainer.log_every_n_steps=50", "logger=none"], tmp_path)
    parts = build(cfg)
    trainer = build_trainer(cfg, tmp_path)
    trainer.callbacks.append(_NanLossAt({13}))
    with pytest.raises(NonFiniteLossError, match="at step 13 "):
        trainer.fit(parts.module, datamodule=parts.datamodule)
    assert 13 <= trainer.global_step <= 13 + 4  # stopped within one check interval, not at step 50


@pytest.mark.parametrize("experiment", ["mnist_ddpm", "states"])
def test_explore_task_writes_grid_and_stats(experiment, tmp_path):
    run = tmp_path / "run"
    extra = data_overrides("mnist", tmp_path) if experiment == "mnist_ddpm" else []
    proc = run_cli([f"experiment={experiment}", "task=explore", *extra, f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((run / "results.json").read_text())["stats"]
    assert (run / "data_grid.png").is_file()
    assert sum(stats["class_counts"]) == stats["n"]
    if experiment == "mnist_ddpm":
        assert stats["grid_images"] >= 16 and stats["shape"] == [1, 28, 28]
    _, images = scalars_and_images(run)
    assert "data/train_grid" in images
