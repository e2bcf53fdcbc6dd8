"""The KL-autoencoder (task=train_autoencoder), LPIPS and load_autoencoder, against closed forms and read-backs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, compose_cfg, float64, run_cli  # noqa: F401  (float64: the fixture used below)
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from test_image_runs import mnist_root

from diffusion_lab.autoencoder import (
    AutoencoderModule,
    adaptive_weight,
    hinge_d_loss,
    load_autoencoder,
    pair_metrics,
    reconstruct,
)
from diffusion_lab.build import ConfigError, make
from diffusion_lab.lpips import LPIPS
from diffusion_lab.nets.autoencoder import KLAutoencoder, PatchDiscriminator, kl_divergence

LPIPS_DIR = Path(os.environ.get("DIFFUSION_LAB_LPIPS") or REPO.parent / "shared" / "data" / "weights" / "lpips")
INCEPTION = REPO.parent / "shared" / "data" / "weights" / "pt_inception-2015-12-05_reconstructed_fc-nan.pth"
needs_lpips = pytest.mark.skipif(not (LPIPS_DIR / "alexnet_features.pth").is_file(),
                                 reason=f"LPIPS trunk weights absent ({LPIPS_DIR}/alexnet_features.pth)")
FAST = ["debug=fast", "callbacks.progress=null", "trainer.enable_model_summary=false"]


def _example(name: str) -> torch.Tensor:
    img = np.array(Image.open(LPIPS_DIR / "examples" / f"ex_{name}.png").convert("RGB"))
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1  # lpips.im2tensor's [-1, 1]


COVERED = {"mnist_autoencoder", "imagenet100_autoencoder"}  # experiments run end to end here (test_runs checks)


@needs_lpips
@pytest.mark.parametrize("net,expected", [("alex", (0.721881, 0.137566)), ("vgg", (0.568613, 0.421664))])
def test_lpips_reproduces_the_reference_distances(net, expected):
    # AlexNet: the PerceptualSimilarity example's published (0.722, 0.138); VGG: the weights README's values
    lpips = LPIPS(net, LPIPS_DIR)
    ref = _example("ref")
    d = lpips(torch.cat([ref, ref]), torch.cat([_example("p0"), _example("p1")]))
    assert d.tolist() == pytest.approx(expected, abs=2e-6)


@needs_lpips
def test_lpips_is_frozen_differentiable_and_grey_is_rgb():
    lpips = LPIPS("alex", LPIPS_DIR / "alexnet_features.pth").train()
    assert not lpips.training and not any(p.requires_grad for p in lpips.parameters())
    x = (torch.rand(2, 1, 32, 32) * 2 - 1).requires_grad_()
    y = torch.rand(2, 1, 32, 32) * 2 - 1
    d = lpips(x, y)
    d.sum().backward()
    assert d.shape == (2,) and x.grad.abs().sum() > 0
    assert torch.equal(d.detach(), lpips(x.detach().expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)))
    assert torch.allclose(lpips(y, y), torch.zeros(2), atol=1e-6)


def test_lpips_bad_weights_fail_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^lpips.weights=.*not found .*DIFFUSION_LAB_LPIPS"):
        LPIPS("alex", tmp_path)
    torch.save({"0.weight": torch.zeros(3)}, tmp_path / "alexnet_features.pth")
    with pytest.raises(ConfigError, match=r"^lpips.weights=.*not the alex trunk") as info:
        LPIPS("alex", tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.usefixtures("float64")
def test_kl_is_the_closed_form_gaussian_kl():
    mean, logvar = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    assert torch.allclose(kl_divergence(mean, logvar), expected, rtol=1e-12)
    assert torch.equal(kl_divergence(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)), torch.zeros(2))


@pytest.mark.usefixtures("float64")
def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms():
    w = torch.randn(4, 3, requires_grad=True)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    # d/dW sum(W * a) = a, so the weight is |a| / (|b| + 1e-4)
    got = adaptive_weight((w * a).sum(), (w * b).sum(), w)
    assert got.item() == pytest.approx((a.norm() / (b.norm() + 1e-4)).item(), rel=1e-12)
    assert not got.requires_grad
    assert adaptive_weight((w * a).sum(), (w * 0).sum(), w).item() == 1e4  # clamped where the GAN has no gradient


def test_hinge_loss_closed_form():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = (0, 0.5, 2) -> mean 5/6; relu(1 + fake) = (0, 1, 2.5) -> mean 7/6
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 7 / 6))


@pytest.mark.parametrize("preset,latent,params", [("kl_mnist", (4, 8, 8), 953_413), ("kl_f4", (3, 32, 32), 55_312_063),
                                                  ("kl_f8", (4, 16, 16), 83_653_863)])
def test_presets_shapes_and_sizes(preset, latent, params, tmp_path):
    data = ["data=mnist", "data.pad_to_32=true", "data.image_size=32"] if preset == "kl_mnist" else \
        ["data=imagefolder", "data.image_size=128"]
    cfg = compose_cfg([f"autoencoder={preset}", *data], tmp_path)
    with torch.device("meta"):  # the 55M / 84M nets: shapes and counts without allocating weights
        net = make(cfg, "autoencoder")
    assert net.latent_shape == latent and net.factor == {"kl_mnist": 4, "kl_f4": 4, "kl_f8": 8}[preset]
    if preset == "kl_f4":  # LDM's kl-f4: 55.3M parameters
        assert round(sum(p.numel() for p in net.parameters()) / 1e6, 1) == 55.3
    in_channels = 3 if preset != "kl_mnist" else 1
    assert sum(p.numel() for p in net.parameters()) == params and net.in_channels == in_channels


def test_encode_decode_shapes_and_logvar_clamp():
    net = KLAutoencoder(in_channels=3, image_size=16, ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=2,
                        attn_resolutions=[8], norm_groups=4)
    mean, logvar = net.encode(torch.rand(5, 3, 16, 16) * 2 - 1)
    assert mean.shape == logvar.shape == (5, 2, 8, 8) == (5, *net.latent_shape) and net.factor == 2
    assert net.decode(mean).shape == (5, 3, 16, 16)
    with torch.no_grad():
        net.quant_conv.bias[2:] = 1e3  # logvar channels far out of range
    assert net.encode(torch.zeros(1, 3, 16, 16))[1].max().item() == 20.0
    with pytest.raises(ValueError, match=r"^image_size=18: must be divisible by the downsampling factor"):
        KLAutoencoder(in_channels=1, image_size=18, ch=8, ch_mult=[1, 2, 2])


def test_gan_losses_reach_only_their_own_players():
    """One optimizer step trains both players: the generator's gradient must be that of its own loss alone
    (no push from the discriminator's loss) and the discriminator's that of the hinge loss alone."""
    net = KLAutoencoder(in_channels=1, image_size=16, ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=2,
                        norm_groups=4)
    disc = PatchDiscriminator(1, 8, 2)
    module = AutoencoderModule(net, torch.optim.Adam, lpips_weight=0.0, disc=disc, disc_start=0)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    torch.manual_seed(0)
    out = module.losses(x)
    (out["generator"] + out["discriminator"]).backward()
    both = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = module.losses(x)
    assert out["d_weight"] > 0 and out["discriminator"] > 0
    out["generator"].backward()
    for name, p in module.named_parameters():
        if name.startswith("net."):
            assert torch.allclose(both[name], p.grad, atol=1e-6), name
        else:
            assert p.grad is None, name  # the generator's loss leaves the discriminator alone
    module.zero_grad(set_to_none=True)
    out["discriminator"].backward()
    for name, p in module.named_parameters():
        if name.startswith("disc."):
            assert torch.allclose(both[name], p.grad, atol=1e-6), name
        else:
            assert p.grad is None, name  # ... and the discriminator's leaves the autoencoder alone


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """One debug=fast run of experiment=mnist_autoencoder, with the PatchGAN on from step 2 (of 4)."""
    if not (LPIPS_DIR / "alexnet_features.pth").is_file():
        pytest.skip(f"LPIPS trunk weights absent ({LPIPS_DIR})")
    tmp = tmp_path_factory.mktemp("ae")
    run = tmp / "run"
    overrides = ["experiment=mnist_autoencoder", *FAST, f"data.root={mnist_root(tmp)}", "data.download=false",
                 f"lpips.weights={LPIPS_DIR}", "task.eval_n=16", "task.rfid_n=16", "task.disc_start=2",
                 "task.disc_ch=8", "task.disc_layers=2", f"eval.fidelity.cache_dir={tmp / 'cache'}",
                 f"task.rfid={INCEPTION.is_file()}",
                 f"eval.fidelity.weights={INCEPTION if INCEPTION.is_file() else None}"]
    cfg = compose_cfg(overrides, run)
    results = instantiate(cfg.task)(cfg, run)  # as run.py dispatches it
    return cfg, run, results


def test_train_autoencoder_debug_fast_writes_everything(fast_run):
    cfg, run, results = fast_run
    for name in ("checkpoints/last.ckpt", "results.json", "report.md", "reconstructions.png", "config.yaml"):
        assert (run / name).is_file(), name
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk["metrics"] == pytest.approx(results["metrics"])
    metrics, protocol = on_disk["metrics"], on_disk["protocol"]
    assert {"psnr", "ssim", "lpips"} <= set(metrics) and all(np.isfinite(list(metrics.values())))
    assert ("rfid" in metrics) == INCEPTION.is_file()
    assert protocol["step"] == 4 and protocol["heldout"]["n"] == 16 and protocol["heldout"]["split"] == "test"
    assert protocol["autoencoder"]["latent_shape"] == [4, 8, 8]
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("disc.") for k in state)  # the GAN's state resumes with the run ...
    assert not any("lpips" in k for k in state)  # ... LPIPS is in no state_dict
    grid = Image.open(run / "reconstructions.png")
    assert grid.size == (8 * 34 + 2, 4 * 34 + 2)  # 8 images per row, 2 pairs of rows of 16 held-out digits
    assert "reconstructions.png" in (run / "report.md").read_text()


def test_load_autoencoder_round_trip(fast_run):
    """The loaded net reproduces the run's own held-out numbers; info names the file by its bytes."""
    cfg, run, results = fast_run
    path = run / "checkpoints" / "last.ckpt"
    net, info = load_autoencoder(path)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and info["step"] == 4
    assert info["config"] == OmegaConf.to_container(cfg.autoencoder, resolve=True)
    real = make(cfg, "data").real_uint8("test", 16)
    cpu = torch.device("cpu")
    again = pair_metrics(real, reconstruct(net, real, cpu), LPIPS("alex", LPIPS_DIR), cpu)
    assert again == pytest.approx({k: results["metrics"][k] for k in again}, abs=1e-5)


def test_load_autoencoder_refuses_other_checkpoints_in_one_line(tmp_path):
    path = tmp_path / "diffusion.ckpt"
    torch.save({"state_dict": {}, "config": {"task": {"_target_": "diffusion_lab.tasks.train", "_partial_": True}}},
               path)
    with pytest.raises(ConfigError) as info:
        load_autoencoder(path, key="space.ckpt")
    assert str(info.value) == (f"space.ckpt={path}: not an autoencoder checkpoint (written by task "
                               "diffusion_lab.tasks.train); expected one from task=train_autoencoder")


def write_imagefolder(root: Path, size: tuple[int, int] = (150, 136)) -> None:
    """A tiny class-per-folder tree with train/ and validation/ splits of non-square RGB images."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("validation", 2)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


@pytest.mark.slow
@needs_lpips
def test_imagenet100_autoencoder_runs_on_a_128px_imagefolder(tmp_path):
    """experiment=imagenet100_autoencoder (kl_f4, 55M) composes and runs debug=fast end to end on 128px images."""
    write_imagefolder(tmp_path / "in100")
    run = tmp_path / "run"
    proc = run_cli(["experiment=imagenet100_autoencoder", *FAST, f"data.root={tmp_path / 'in100'}",
                    "data.num_workers=0", "data.batch_size=2", "trainer.max_steps=2", f"lpips.weights={LPIPS_DIR}",
                    "task.rfid=false", f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["protocol"]["heldout"] == {"dataset": "imagefolder", "split": "validation", "n": 4, "subset_seed": 0,
                                              "encoding": "posterior mean, decoded, quantised to uint8"}
    assert results["protocol"]["autoencoder"] == {"parameters": 55_312_063, "factor": 4, "latent_shape": [3, 32, 32]}
    assert (run / "reconstructions.png").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
