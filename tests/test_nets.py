"""Image nets: shape contract of every preset, parameter counts, conditioning, bf16 attention, layouts, grads."""

from __future__ import annotations

import pytest
import torch
from helpers import CONF
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion_lab.nets import SimpleUNet, UNet
from diffusion_lab.nets.unet import AttnBlock

# preset name -> (channels, image_size) of the data it is meant for
PRESETS = {"simple_unet": (1, 28), "unet_mnist": (1, 28), "unet_tiny": (1, 28), "unet_cifar": (3, 32),
           "unet_celeba64": (3, 64)}


def preset(name: str, channels: int | None = None, image_size: int | None = None, **overrides):
    """Instantiate conf/model/<name>.yaml with the data-dependent keys filled, so tests check the YAML too."""
    cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    c, s = PRESETS[name]
    cfg.in_channels, cfg.image_size = channels or c, image_size or s
    return instantiate(OmegaConf.merge(cfg, overrides))


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def unzero(net: UNet) -> UNet:
    """Re-randomise UNet's zero-initialised output conv: at init the net outputs 0 whatever t and cond are."""
    torch.nn.init.normal_(net.out[-1].weight, std=0.05)
    torch.nn.init.normal_(net.out[-1].bias, std=0.05)
    return net


def inputs(net, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, net.in_channels, net.image_size, net.image_size, generator=g)
    return x, torch.rand(batch, generator=g)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_keeps_the_input_shape(name):
    torch.manual_seed(0)
    net = preset(name).eval()
    x, t = inputs(net, batch=1)
    with torch.no_grad():
        out = net(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_simple_unet_runs_at_32():
    net = SimpleUNet(in_channels=3, image_size=32).eval()  # bottleneck 8x8 instead of 7x7
    x, t = inputs(net)
    assert net(x, t).shape == x.shape


def test_unet_cifar_has_ho_et_al_parameter_count():
    count = n_params(preset("unet_cifar"))
    assert count == 35_746_307  # Ho et al. 2020 report 35.7M
    assert abs(count - 35.7e6) / 35.7e6 < 0.03


def test_unet_tiny_is_cpu_sized():
    assert n_params(preset("unet_tiny")) < 1_000_000


def calibrate(net: SimpleUNet) -> SimpleUNet:
    """Fill BatchNorm running stats from one batch: with fresh stats (mean 0, var 1) eval-mode activations
    shrink layer by layer and the bottleneck modulation barely reaches the output."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one batch sets the stats exactly
    with torch.no_grad():
        net.train()(*inputs(net, batch=8, seed=1), torch.arange(8) % 10 - 1)
    return net.eval()


def conditional_nets():
    torch.manual_seed(0)
    return [calibrate(SimpleUNet(num_classes=10)), unzero(preset("unet_tiny", num_classes=10)).eval()]


@pytest.mark.parametrize("idx", [0, 1], ids=["simple_unet", "unet"])
def test_class_conditioning_changes_output_and_null_equals_none(idx):
    net = conditional_nets()[idx]
    x, t = inputs(net, batch=3)
    with torch.no_grad():
        a = net(x, t, torch.tensor([0, 1, 2]))
        b = net(x, t, torch.tensor([3, 4, 5]))
        null = net(x, t, torch.tensor([-1, -1, -1]))
        none = net(x, t, None)
    assert not torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, null, atol=1e-4)
    torch.testing.assert_close(null, none)


def test_simple_unet_null_class_vector_is_zero():
    net = SimpleUNet(num_classes=4)
    c = net.class_vector(torch.tensor([2, -1]), 2, "cpu")
    torch.testing.assert_close(c, torch.tensor([[0.0, 0, 1, 0], [0, 0, 0, 0]]))


@pytest.mark.parametrize("idx", [0, 1], ids=["simple_unet", "unet"])
def test_time_conditioning_changes_output(idx):
    net = conditional_nets()[idx]
    x, _ = inputs(net)
    with torch.no_grad():
        a, b = net(x, torch.full((2,), 0.1)), net(x, torch.full((2,), 0.9))
    assert not torch.allclose(a, b, atol=1e-4)


def test_simple_unet_without_time_conditioning_ignores_t():
    torch.manual_seed(0)
    net = SimpleUNet(time_conditioning=False).eval()
    x, _ = inputs(net)
    with torch.no_grad():
        torch.testing.assert_close(net(x, torch.zeros(2)), net(x, torch.ones(2)))


def test_attention_under_bf16_autocast_is_finite_and_close_to_fp32():
    torch.manual_seed(0)
    attn = AttnBlock(64, num_heads=2)
    x = 4 * torch.randn(2, 64, 16, 16)  # large activations: sharp softmax over 256 tokens
    ref = attn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attn(x)
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.1)


def test_attention_core_runs_in_fp32_with_autocast_off(monkeypatch):
    # CPU's bf16 SDPA kernel happens to accumulate in fp32, so an end-to-end error cannot tell the
    # difference on CPU; check the mechanism that protects the fp16/bf16 GPU kernels instead.
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        AttnBlock(32)(torch.randn(1, 32, 8, 8))
    assert seen == [(torch.float32, torch.float32, torch.float32, False)]


def test_unet_under_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(0)
    net = unzero(preset("unet_tiny", num_classes=3)).eval()
    x, t = inputs(net)
    cond = torch.tensor([0, -1])
    with torch.no_grad():
        ref = net(x, t, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, t, cond)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.02


@pytest.mark.parametrize("idx", [0, 1], ids=["simple_unet", "unet"])
def test_channels_last_matches_contiguous(idx):
    net = conditional_nets()[idx]
    x, t = inputs(net)
    cond = torch.tensor([1, -1])
    with torch.no_grad():
        ref = net(x, t, cond)
        out = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, cond)
    torch.testing.assert_close(out.contiguous(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("idx", [0, 1], ids=["simple_unet", "unet"])
def test_gradient_reaches_every_parameter(idx):
    net = conditional_nets()[idx].train()
    x, t = inputs(net, batch=4)
    cond = torch.tensor([0, 3, -1, 7])  # -1 so the null row / zero-vector path is used too
    net(x, t, cond).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("kwargs,match", [
    (dict(image_size=30), r"^image_size=30: must be divisible"),
    (dict(attn_resolutions=(12,)), r"^attn_resolutions=\[12\]: not among"),
    (dict(ch=48), r"^ch=48: expected a multiple of 32"),
])
def test_unet_bad_arguments_fail_with_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)


def test_simple_unet_rejects_sizes_off_the_bottleneck():
    with pytest.raises(ValueError, match=r"^image_size=30: expected a multiple of 4"):
        SimpleUNet(image_size=30)
