"""The KL-autoencoder (task=train_autoencoder), LPIPS and load_autoencoder, against closed forms and read-backs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, compose_cfg, float64, run_cli  # noqa: F401 (float64: a fixture)
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
    train_autoencoder,
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


def test_kl_is_the_closed_form_gaussian_kl(float64):
    mean, logvar = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    assert torch.allclose(kl_divergence(mean, logvar), expected, rtol=1e-12)
    assert torch.equal(kl_divergence(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)), torch.zeros(2))


def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms(float64):
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
