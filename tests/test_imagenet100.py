"""The ImageNet-100 study (issue 14; the seed's Table 3): the eight imagenet100_* rows compose as the table
says, sweep=imagenet100_table lists exactly them, and they run debug=fast end to end on a tiny 128px
class-per-folder JPEG tree in the seed's layout (imagenet100_128x128/{train,validation}/<class>/*.JPEG)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CONF, REPO, compose_cfg, run_cli, write_autoencoder_ckpt
from hydra import compose, initialize_config_dir
from PIL import Image

from diffusion_lab.build import make

# Table 3 of the seed: (VAE?, CFG?, backbone) per row, and the sampler its text gives the row: DDPM rows
# ancestral over all 1000 steps, DDIM rows 500 deterministic steps.
ROWS = {
    "imagenet100_ddpm": (False, False, "UNet", "ancestral", 1000),
    "imagenet100_ddpm_vae": (True, False, "UNet", "ancestral", 1000),
    "imagenet100_ddpm_cfg": (False, True, "UNet", "ancestral", 1000),
    "imagenet100_ddpm_vae_cfg": (True, True, "UNet", "ancestral", 1000),
    "imagenet100_ddim": (False, False, "UNet", "ddim", 500),
    "imagenet100_ddim_vae_cfg": (True, True, "UNet", "ddim", 500),
    "imagenet100_dit_vae_cfg_8": (True, True, "DiT", "ancestral", 1000),
    "imagenet100_dit_vae_cfg_12": (True, True, "DiT", "ancestral", 1000),
}
COVERED = set(ROWS)  # experiments run end to end here (test_runs checks every experiment is covered)
CLASSES = ("n01440764", "n01443537", "n01484850")  # ImageNet synset folder names, as in the real tree
INCEPTION = REPO.parent / "shared" / "data" / "weights" / "pt_inception-2015-12-05_reconstructed_fc-nan.pth"


def write_imagenet100(root: Path, per_class: dict[str, int] | None = None) -> Path:
    """<root>/{train,validation}/<synset>/<synset>_<i>.JPEG: non-square RGB JPEGs (resized + centre-cropped
    to 128 on load), 4 training and 2 validation images per class."""
    rng = np.random.default_rng(0)
    for split, n in (per_class or {"train": 4, "validation": 2}).items():
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (136, 150, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{cls}_{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def in100(tmp_path_factory) -> Path:
    return write_imagenet100(tmp_path_factory.mktemp("data") / "imagenet100_128x128")


@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory) -> Path:
    """A width-8 kl-f4 in imagenet100_autoencoder's layout: 3x128x128 images -> 3x32x32 latents."""
    return write_autoencoder_ckpt(tmp_path_factory.mktemp("ae") / "last.ckpt", experiment="imagenet100_autoencoder")


def run_args(in100: Path, ae_ckpt: Path, tmp_path: Path) -> list[str]:
    """debug=fast on the fixture: its 3 classes, 2 samples (per class under CFG), only the final checkpoint
    (a 92M U-Net's checkpoint with EMA and Adam moments is ~1.5 GB)."""
    return ["debug=fast", f"data.root={in100}", "data.num_classes=3", "data.num_workers=0",
            f"autoencoder_ckpt={ae_ckpt}", "callbacks.progress=null", "trainer.enable_model_summary=false",
            "callbacks.checkpoint.every_n_train_steps=1000", "eval.n_samples=2",
            f"eval.fidelity.cache_dir={tmp_path / 'fidelity'}", f"data.latent_cache_dir={tmp_path / 'latents'}"]


def test_the_data_config_reads_the_seeds_layout(in100, tmp_path):
    """data=imagenet100 on JPEG files: labels from the sorted synset folders, 150x136 files resized and
    centre-cropped to 128, the held-out split is validation/ (the FID reference and classifier accuracy)."""
    dm = make(compose_cfg(["data=imagenet100", "model=unet_tiny", f"data.root={in100}", "data.num_classes=3",
                           "data.num_workers=0", "data.batch_size=4"], tmp_path), "data")
    assert dm.describe()["n"] == 12 and dm.class_names == list(CLASSES)
    assert dm.has_split("validation") and not dm.has_split("test")
    x, y = dm.labelled("validation")
    assert x.dtype == torch.uint8 and tuple(x.shape) == (6, 3, 128, 128) and y.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(dm.real_uint8("validation"), x)
    batch = next(iter(dm.train_dataloader()))
    assert tuple(batch["x"].shape) == (4, 3, 128, 128) and set(batch["cond"].tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("experiment", sorted(ROWS))
def test_the_eight_rows_compose_as_table_3(experiment, ae_ckpt, tmp_path):
    vae, cfg_guided, backbone, sampler, steps = ROWS[experiment]
    cfg = compose_cfg([f"experiment={experiment}", f"autoencoder_ckpt={ae_ckpt}"], tmp_path)
    # shared by every row: the data, DDPM's training recipe, the seed's batch / lr and its evaluation
    assert cfg.data.name == "imagenet100" and cfg.data.root.endswith("imagenet100_128x128")
    assert (cfg.data.image_size, cfg.data.num_classes, cfg.data.val_split) == (128, 100, "validation")
    assert cfg.schedule.T == 1000 and (cfg.schedule.beta_start, cfg.schedule.beta_end) == (1e-4, 0.02)
    assert cfg.objective._target_.endswith("EpsPrediction")
    assert (cfg.data.batch_size, cfg.optimizer.lr, cfg.trainer.precision) == (32, 2e-4, "bf16-mixed")
    assert list(cfg.eval.metrics) == ["fid", "isc"] and cfg.eval.reference.split == "validation"
    per_request = cfg.data.num_classes if cfg.eval.classes == "all" else 1
    assert cfg.eval.n_samples * per_request == 5000  # the seed's 5,000 samples
    # what distinguishes the rows
    assert cfg.space._target_.endswith("AutoencoderSpace" if vae else "PixelSpace")
    assert cfg.sampler._target_.endswith(f"sample_{sampler}") and cfg.sampler.steps == steps
    assert (cfg.get("guidance") or {}).get("scale") == (2.0 if cfg_guided else None)
    assert cfg.objective.p_uncond == (0.1 if cfg_guided else 0.0)
    assert cfg.model.num_classes == (100 if cfg_guided else 0)
    assert cfg.eval.classes == ("all" if cfg_guided else None)
    with torch.device("meta"):  # the real sizes (22M-92M), without allocating them
        net = make(cfg, "model")
    assert type(net).__name__ == backbone
    assert (cfg.space.channels, cfg.space.image_size) == ((3, 32) if vae else (3, 128))
    if backbone == "UNet":  # the counts stated in conf/model/unet_imagenet128.yaml and unet_latent32.yaml
        expected = {(False, False): 92_179_331, (False, True): 92_231_043,
                    (True, False): 84_277_379, (True, True): 84_329_091}[(vae, cfg_guided)]
        assert sum(p.numel() for p in net.parameters()) == expected
    else:  # counted from DiT's layout (Peebles & Xie 2023, DiT-S width)
        assert sum(p.numel() for p in net.parameters()) == dit_parameters(int(experiment.rsplit("_", 1)[1]))


def dit_parameters(depth: int, h: int = 384, patch: int = 2, c: int = 3, classes: int = 100, freq: int = 256) -> int:
    """DiT's trainable parameters: adaLN-Zero blocks (qkv + proj, a 4h MLP, the 6h modulation), patchify
    conv, timestep MLP on a `freq`-dim sinusoid, label table with the null row, final adaLN + linear layer;
    the sin-cos position table is fixed."""
    block = (h * 3 * h + 3 * h) + (h * h + h) + (h * 4 * h + 4 * h) + (4 * h * h + h) + (h * 6 * h + 6 * h)
    patchify = c * patch * patch * h + h
    timestep = (freq * h + h) + (h * h + h)
    final = (h * 2 * h + 2 * h) + (h * patch * patch * c + patch * patch * c)
    return depth * block + patchify + timestep + (classes + 1) * h + final


def test_the_sweep_runs_exactly_the_eight_rows():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["sweep=imagenet100_table"], return_hydra_config=True)
    cases = [case.split() for case in cfg.hydra.sweeper.cases]
    assert all(len(case) == 1 and case[0].startswith("experiment=") for case in cases)
    rows = [case[0].removeprefix("experiment=") for case in cases]
    studied = {p.stem for p in (CONF / "experiment").glob("imagenet100_*.yaml")} - {"imagenet100_autoencoder"}
    assert len(rows) == 8 and set(rows) == set(ROWS) == studied
    assert cfg.hydra.sweeper._target_.endswith("CasesSweeper") and cfg.hydra.sweep.dir == "multirun/imagenet100_table"


def test_a_tree_with_other_classes_fails_in_one_line_before_any_work(in100, tmp_path):
    proc = run_cli(["experiment=imagenet100_ddpm", f"data.root={in100}", f"hydra.run.dir={tmp_path / 'run'}"])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2 and lines == [
        "error: data.num_classes=100: expected 0 (unconditional) or 3 (the classes of imagenet100)"], proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_latent_row_without_the_autoencoder_names_the_key(tmp_path):
    proc = run_cli(["experiment=imagenet100_ddpm_vae", f"hydra.run.dir={tmp_path / 'run'}"])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2 and lines == [
        "error: autoencoder_ckpt: missing; expected an autoencoder .ckpt written by task=train_autoencoder "
        "(autoencoder_ckpt=<path>, read by space.ckpt)"], proc.stderr


def multirun(cases: list[str], extra: list[str], in100: Path, ae_ckpt: Path, tmp_path: Path):
    """One Hydra multirun of sweep=imagenet100_table (its launcher, cases and per-job directories)."""
    quoted = ",".join(f'"{case}"' for case in cases)
    proc = run_cli(["-m", "sweep=imagenet100_table", f"hydra.sweeper.cases=[{quoted}]",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}", *run_args(in100, ae_ckpt, tmp_path), *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = {}
    for results in (tmp_path / "sweep").glob("*/results.json"):
        jobs[results.parent] = json.loads(results.read_text())
    return jobs


def check_row(job: Path, res: dict, n: int = 2, classes: int = 3) -> str:
    """The row's results.json: its protocol names the space, sampler, guidance and samples it ran under."""
    proto = res["protocol"]
    experiment = proto["title"]
    vae, cfg_guided, backbone, sampler, _ = ROWS[experiment]
    assert proto["backbone"] == backbone  # Table 3's columns: backbone, VAE (space), CFG (guidance)
    assert proto["step"] == 2 and proto["data"]["name"] == "imagenet100" and proto["data"]["num_classes"] == classes
    assert proto["space"]["space"] == ("AutoencoderSpace" if vae else "PixelSpace")
    assert proto["sampler"] == sampler and proto["steps"] == 4
    assert proto["guidance"] == ("classifier_free" if cfg_guided else None)
    assert proto["n_samples"] == (n * classes if cfg_guided else n)
    assert res["metrics"]["n_images"] == proto["n_samples"]  # decoded to 128px pixels in every row
    assert (job / "samples.png").is_file() and (job / "checkpoints" / "last.ckpt").is_file()
    return experiment


def test_a_pixel_row_and_a_dit_row_run_debug_fast_as_one_sweep(in100, ae_ckpt, tmp_path):
    """The default suite's share: DDPM (the pixel U-Net at width 32: at 92M a pixel row costs minutes on this
    CPU; test_all_eight_rows runs all eight as configured) and DiT-VAE-CFG-12 (as configured, 33M: latents,
    the autoencoder, CFG), two steps at batch 2, no monitor grids, one sample (per class)."""
    jobs = multirun(["experiment=imagenet100_ddpm model.ch=32", "experiment=imagenet100_dit_vae_cfg_12"],
                    ["trainer.max_steps=2", "data.batch_size=2", "callbacks.samples=null", "eval.n_samples=1",
                     "eval.metrics=[]"], in100, ae_ckpt, tmp_path)
    assert sorted(check_row(job, res, n=1) for job, res in jobs.items()) == ["imagenet100_ddpm",
                                                                            "imagenet100_dit_vae_cfg_12"]
    names = sorted(job.name for job in jobs)  # the row leads each job's directory name
    assert names[0].startswith("000_imagenet100_ddpm_") and names[1].startswith("001_imagenet100_dit_vae_cfg_12_")


@pytest.mark.slow  # all eight rows at their configured sizes: ~10 min on 2 cores (make test-slow)
def test_all_eight_rows_run_debug_fast_and_collect_into_table_3(in100, ae_ckpt, tmp_path):
    metrics = ["eval.metrics=[]"]
    if INCEPTION.is_file():  # FID and IS as configured (the offline weights lack IS's fc layer: a note)
        metrics = [f"eval.fidelity.weights={INCEPTION}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cases = list(compose(config_name="config", overrides=["sweep=imagenet100_table"],
                             return_hydra_config=True).hydra.sweeper.cases)
    jobs = multirun(cases, ["trainer.max_steps=2", *metrics], in100, ae_ckpt, tmp_path)
    assert sorted(check_row(job, res) for job, res in jobs.items()) == sorted(ROWS)
    if INCEPTION.is_file():
        for res in jobs.values():
            assert np.isfinite(res["metrics"]["fid"]) and res["protocol"]["reference"]["split"] == "validation"
    proc = run_cli_module(["diffusion_lab.sweeps", "collect", str(tmp_path / "sweep"), "--metric", "fid"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "sweep" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["override:experiment"] for r in rows) == sorted(ROWS) and {r["status"] for r in rows} == {"ok"}
    assert (tmp_path / "sweep" / "results.md").is_file()


def run_cli_module(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
