"""The space seam: pixels and points round trips, the frozen autoencoder's latents (scaling, hygiene, sha256),
the latent cache (equal to on-the-fly encoding, hit on the second run) and a diffusers AutoencoderKL folder."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, compose_cfg, run_cli, write_autoencoder_ckpt, write_idx
from omegaconf import open_dict

from diffusion_lab.build import ConfigError, build, make
from diffusion_lab.latents import build_cache
from diffusion_lab.preflight import prepare_space
from diffusion_lab.spaces import AutoencoderSpace, PixelSpace, PointSpace, from_uint8, to_uint8

SMALL_UNET = ["model.ch=32", "model.num_res_blocks=1"]
COVERED = {"mnist_ldm", "mnist_ldm_pixels", "mnist_dit", "mnist_dit_latent"}  # run end to end here (test_runs checks)


def mnist_fixture(root: Path, n: int = 40) -> Path:
    """A tiny MNIST in the real IDX .gz layout (random digits, labels 0..9)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("t10k", n // 2)):
        write_idx(raw / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
        write_idx(raw / f"{split}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    return root


@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory) -> Path:
    return write_autoencoder_ckpt(tmp_path_factory.mktemp("ae") / "ae.ckpt")


def latent_cfg(tmp_path: Path, ae: Path, extra: list[str] = ()):
    root = mnist_fixture(tmp_path / "data")
    cfg = compose_cfg(["experiment=mnist_ldm", f"space.ckpt={ae}", f"data.root={root}", "data.batch_size=8",
                       f"data.latent_cache_dir={tmp_path / 'latents'}", *SMALL_UNET, *extra], tmp_path)
    return cfg


def test_pixel_round_trip_is_exact_and_points_are_identity():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    pixels = PixelSpace(1, 16)
    assert torch.equal(to_uint8(pixels.decode(pixels.encode(u))), u)
    assert torch.equal(pixels.encode(u), u.float() / 127.5 - 1)  # DDPM's map, not a rescaled one
    x = torch.randn(5, 2)
    points = PointSpace(2)
    assert points.shape == (2,) and torch.equal(points.decode(points.encode(x)), x)


def test_nets_read_their_shape_from_the_space(ae_ckpt, tmp_path):
    cfg = latent_cfg(tmp_path, ae_ckpt)
    assert (cfg.model.in_channels, cfg.model.image_size) == (4, 8)  # the autoencoder's 4x8x8 latents
    pixels = compose_cfg(["experiment=mnist_ldm_pixels", "data.root=x"], tmp_path)
    assert (pixels.model.in_channels, pixels.model.image_size) == (1, 32)


def test_autoencoder_space_is_frozen_and_outside_the_model(ae_ckpt, tmp_path):
    cfg = latent_cfg(tmp_path, ae_ckpt)
    parts = build(cfg)
    module, space = parts.module, parts.module.space
    assert isinstance(space, AutoencoderSpace) and space.shape == (4, 8, 8) and space.data_shape == (1, 32, 32)
    ae_params = {id(p) for p in space.net.parameters()}
    assert not any(p.requires_grad for p in space.net.parameters())
    assert not any(k.startswith("space") or "encoder" in k for k in module.state_dict())
    assert ae_params.isdisjoint(id(p) for p in module.parameters())
    optimizer = module.optimizer_factory(module.net.parameters())
    assert ae_params.isdisjoint(id(p) for g in optimizer.param_groups for p in g["params"])
    assert copy.deepcopy(module).space is space  # the EMA copy shares the frozen space, never averages it
    averaged = torch.optim.swa_utils.AveragedModel(module, use_buffers=True)
    assert ae_params.isdisjoint(id(p) for p in averaged.parameters())


def test_measured_scaling_is_the_mean_and_std_of_posterior_samples(ae_ckpt, tmp_path):
    space = make(latent_cfg(tmp_path, ae_ckpt), "space")
    images = torch.randint(0, 256, (30, 1, 32, 32), dtype=torch.uint8)
    space.measure(images, seed=3)
    g = torch.Generator().manual_seed(3)
    mean, std = space.posterior(images)  # one batch: the same noise draw as measure's
    z = (mean + std * torch.randn(mean.shape, generator=g)).double()
    assert torch.allclose(space.shift.double(), z.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(space.scale.double(), z.transpose(0, 1).flatten(1).std(1, correction=0), atol=1e-5)
    standardised = space.standardise(z.float())
    assert torch.allclose(standardised.mean((0, 2, 3)), torch.zeros(4), atol=1e-4)
    decoded = space.decode(space.standardise(mean))  # decode undoes the scaling exactly
    assert torch.allclose(decoded, space.net.decode(mean), atol=1e-5)


def test_cached_latents_equal_on_the_fly_encoding_and_the_cache_is_hit(ae_ckpt, tmp_path):
    cfg = latent_cfg(tmp_path, ae_ckpt, ["data.hflip=true"])
    parts = build(cfg)
    dm, space = parts.datamodule, parts.module.space
    dm.setup()
    prepare_space(cfg, parts, resume=None)
    assert space.images_encoded == 2 * 40  # every training digit and its flip, once
    info = space.stats["latent_cache"]
    assert not info["hit"] and info["n"] == 40 and info["flips"] == 2
    cache = torch.load(info["path"], weights_only=True)
    u8 = dm.data[:6]
    for flip in (0, 1):  # same flip and posterior noise: the cached path gives the on-the-fly latent
        view = u8.flip(-1) if flip else u8
        noise_g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
        on_the_fly = space.encode(view, noise_g())
        cached = space.encode_batch({"posterior": cache["posterior"][:6, flip]}, noise_g())
        assert torch.allclose(on_the_fly, cached, atol=1e-6)
    batch = next(iter(dm.train_dataloader()))  # training batches are cached posteriors with a random flip
    assert set(batch) == {"posterior", "cond"} and batch["posterior"].shape == (8, 2, 4, 8, 8)
    again = build(cfg)  # a second run with the same key reads the cache: the encoder sees no image
    again.datamodule.setup()
    prepare_space(cfg, again, resume=None)
    assert again.module.space.images_encoded == 0 and again.module.space.stats["latent_cache"]["hit"]
    assert torch.equal(again.module.space.scale, space.scale)
    other = build_cache(dm, space)  # rebuilding gives the same posteriors (deterministic encoder)
    assert torch.allclose(other["posterior"], cache["posterior"], atol=1e-6)


# 19 s: a latent training, then a refused relaunch (make test-slow); other latent runs stay in the default suite
@pytest.mark.slow
def test_latent_run_records_the_autoencoder_and_refuses_another(ae_ckpt, tmp_path):
    root = mnist_fixture(tmp_path / "data")
    run = tmp_path / "run"
    common = [f"data.root={root}", f"data.latent_cache_dir={tmp_path / 'latents'}", *SMALL_UNET]
    # data.cache_latents=false: this run encodes every batch on the fly (the cache path is tested above)
    r = run_cli(["experiment=mnist_ldm", f"space.ckpt={ae_ckpt}", "debug=fast", "eval.metrics=[]",
                 "data.cache_latents=false", f"hydra.run.dir={run}", *common, *FAST])
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((run / "results.json").read_text())
    space = results["protocol"]["space"]
    assert space["space"] == "AutoencoderSpace" and space["shape"] == [4, 8, 8]
    from diffusion_lab.spaces import file_sha256

    assert space["autoencoder_sha256"] == file_sha256(ae_ckpt)
    assert space["latent_scaling"]["scaling"] == "measured" and len(space["latent_scaling"]["scale"]) == 4
    assert space["latent_scaling"]["source"].startswith("40 training images")  # measured without a cache
    assert results["metrics"]["n_images"] == 10 * results["protocol"]["n_per_class"]  # decoded pixels
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["space"]["sha256"] == file_sha256(ae_ckpt)
    assert not any("encoder" in k for k in ckpt["state_dict"])
    # sampling again reloads the autoencoder named by the checkpoint's config and decodes identically
    again = tmp_path / "again"
    r = run_cli(["task=sample", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={again}",
                 "eval.classes=all", "eval.n_samples=2"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((again / "results.json").read_text())["protocol"]["space"] == space
    # another autoencoder at the recorded path: one line, exit 2, nothing sampled
    write_autoencoder_ckpt(ae_ckpt, seed=1)
    refused = tmp_path / "refused"
    r = run_cli(["task=sample", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={refused}"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "sha256" in lines[0] and "ckpt=" in lines[0]
    assert not (refused / "results.json").exists()
    write_autoencoder_ckpt(ae_ckpt)  # restore the module fixture for later tests


def test_pixel_twin_runs_end_to_end(tmp_path):
    root = mnist_fixture(tmp_path / "data")
    run = tmp_path / "run"
    r = run_cli(["experiment=mnist_ldm_pixels", "debug=fast", "eval.metrics=[]", f"data.root={root}",
                 f"hydra.run.dir={run}", *SMALL_UNET, *FAST])
    assert r.returncode == 0, r.stderr[-2000:]
    protocol = json.loads((run / "results.json").read_text())["protocol"]
    assert protocol["space"] == {"space": "PixelSpace", "shape": [1, 32, 32]} and protocol["classes"]


@pytest.mark.slow  # ~60 s on 2 cores: four training runs; the DiT-on-latents cell runs in the default suite below
def test_backbones_sweep_runs_its_four_cells_at_one_budget(ae_ckpt, tmp_path):
    """sweep=mnist_backbones: U-Net / DiT x pixels / latents as one multirun (one process), every cell with the
    sweep's wall-clock budget and warm-up-then-constant learning rate, collected into one table."""
    from diffusion_lab.sweeps import collect

    root = mnist_fixture(tmp_path / "data")
    out = tmp_path / "sweep"
    r = run_cli(["-m", "sweep=mnist_backbones", f"autoencoder_ckpt={ae_ckpt}", "budget=00:00:30:00", "debug=fast",
                 "eval.metrics=[]", f"hydra.sweep.dir={out}", *FAST],
                # the base config (experiment=states) has no data.root: the MNIST cells read the env roots
                env={"DIFFUSION_LAB_DATA": str(root), "DIFFUSION_LAB_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted(p.parent for p in out.glob("*/results.json"))
    assert len(jobs) == 4
    seen = set()
    for job in jobs:
        cfg = __import__("yaml").safe_load((job / "config.yaml").read_text())
        assert cfg["trainer"]["max_time"] == "00:00:30:00" and cfg["trainer"]["max_steps"] == 4  # debug=fast caps
        assert cfg["lr_scheduler"]["min_factor"] == 1.0
        protocol = json.loads((job / "results.json").read_text())["protocol"]
        seen.add((cfg["model"]["_target_"].rsplit(".", 1)[1], protocol["space"]["space"]))
        assert protocol["guidance"] == "classifier_free" and protocol["sampler"] == "ddim"
    assert seen == {("UNet", "PixelSpace"), ("DiT", "PixelSpace"), ("UNet", "AutoencoderSpace"),
                    ("DiT", "AutoencoderSpace")}
    summary = collect(out, "judge_accuracy")
    assert summary["status"]["ok"] == 4


def test_dit_on_latents_runs_end_to_end(ae_ckpt, tmp_path):
    root = mnist_fixture(tmp_path / "data")
    run = tmp_path / "run"
    r = run_cli(["experiment=mnist_dit_latent", f"space.ckpt={ae_ckpt}", "debug=fast", "eval.metrics=[]",
                 f"data.root={root}", f"data.latent_cache_dir={tmp_path / 'latents'}", f"hydra.run.dir={run}", *FAST])
    assert r.returncode == 0, r.stderr[-2000:]
    protocol = json.loads((run / "results.json").read_text())["protocol"]
    assert protocol["space"]["space"] == "AutoencoderSpace" and protocol["guidance"] == "classifier_free"
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("net.blocks.5.") for k in state)  # dit_latent's six transformer blocks


def test_diffusers_vae_folder_loads_and_round_trips_shapes(tmp_path):
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        pytest.skip("diffusers is not installed (the optional extra: pip install 'diffusion-lab[diffusers]')")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")  # config.json + diffusion_pytorch_model.safetensors, random weights
    cfg = compose_cfg(["data=cifar10", "space=diffusers_vae", f"space.path={tmp_path / 'vae'}", "data.image_size=16",
                       "space.scaling=fixed", "space.scale_factor=0.18215", "model=unet_tiny"], tmp_path)
    assert (cfg.space.channels, cfg.space.image_size) == (4, 8)  # read from config.json, no diffusers import
    space = make(cfg, "space")
    u8 = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    z = space.encode(u8, torch.Generator().manual_seed(0))
    assert z.shape == (3, 4, 8, 8) and space.decode(z).shape == (3, 3, 16, 16)
    mean, _ = space.posterior(u8)
    expected = vae.encode(from_uint8(u8)).latent_dist.mean * 0.18215  # diffusers' fixed-scale convention
    assert torch.allclose(space.standardise(mean), expected, atol=1e-5)
    assert space.describe()["latent_scaling"] == {"scaling": "fixed", "scale_factor": 0.18215, "shift_factor": 0.0}
    with open_dict(cfg):
        cfg.space.path = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="not found"):
        make(cfg, "space")


def test_classifiers_stay_in_pixel_or_point_space(ae_ckpt, tmp_path):
    from diffusion_lab.classifier import train_classifier
    from diffusion_lab.guidance import ClassifierGuidance

    cfg = compose_cfg(["experiment=mnist_ldm", f"space.ckpt={ae_ckpt}", "task=train_classifier", "classifier=conv",
                       f"data.root={mnist_fixture(tmp_path / 'data')}"], tmp_path)
    with pytest.raises(ConfigError, match="^space: task=train_classifier works on pixels or points"):
        train_classifier(cfg, tmp_path / "run", noisy=True)
    guidance = ClassifierGuidance.__new__(ClassifierGuidance)  # only the space check, no checkpoint needed
    guidance.ckpt = "clf.ckpt"
    space = make(latent_cfg(tmp_path, ae_ckpt), "space")
    with pytest.raises(ValueError, match="classifier guidance works on pixels or points"):
        guidance.check(None, None, space)
