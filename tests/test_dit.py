"""The Diffusion Transformer against the paper (Peebles & Xie 2023) and the suite's net contract."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from helpers import CONF
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffusion_lab import objectives as O
from diffusion_lab import samplers as S
from diffusion_lab import schedules as SC
from diffusion_lab.nets import DiT
from diffusion_lab.nets.dit import sincos_pos_embed_2d
from diffusion_lab.samplers import guided_net, make_denoiser

# Peebles & Xie 2023, Table 4 (GFLOPs of one forward on a 32x32x4 latent, 1 multiply-add = 1 FLOP) and
# Table 1 / Sec. 4 (parameters of the /2 models, with 1000 classes and the learned-sigma head).
PAPER_GFLOPS = {"S_8": 0.36, "S_4": 1.41, "S_2": 6.06, "B_8": 1.42, "B_4": 5.56, "B_2": 23.01,
                "L_8": 5.01, "L_4": 19.70, "L_2": 80.71, "XL_8": 7.39, "XL_4": 29.05, "XL_2": 118.64}
PAPER_PARAMS = {"S_2": 33e6, "B_2": 130e6, "L_2": 458e6, "XL_2": 675e6}


def dit_preset(name: str, channels: int = 4, image_size: int = 32, num_classes: int = 1000, **overrides) -> DiT:
    """conf/model/<name>.yaml composed with its `dit` base, data keys filled in (so the YAML is tested too)."""
    cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    base = OmegaConf.load(CONF / "model" / "dit.yaml")
    cfg = OmegaConf.merge(base, {k: v for k, v in cfg.items() if k != "defaults"}, overrides)
    cfg.in_channels, cfg.image_size, cfg.num_classes = channels, image_size, num_classes
    return instantiate(cfg)


def gflops(net: DiT, batch: int = 1) -> float:
    """Forward FLOPs per sample, counted by torch's FlopCounterMode (2 per multiply-add) halved. SDPA runs
    its math backend so the attention matmuls are counted (the fused CPU kernel is not in the registry)."""
    device = next(net.parameters()).device
    x = torch.zeros(batch, net.in_channels, net.image_size, net.image_size, device=device)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(x, torch.zeros(batch, device=device), torch.zeros(batch, dtype=torch.long, device=device))
    return counter.get_total_flops() / 2 / batch / 1e9


@pytest.mark.parametrize("name", sorted(PAPER_GFLOPS))
def test_presets_match_the_papers_gflops_and_parameters(name):
    with torch.device("meta"):  # shapes only: XL/2's 675M parameters cost no memory or init time
        net = dit_preset(f"dit_{name}")
    assert gflops(net) == pytest.approx(PAPER_GFLOPS[name], rel=0.01)
    if name in PAPER_PARAMS:
        assert sum(p.numel() for p in net.parameters()) == pytest.approx(PAPER_PARAMS[name], rel=0.01)


def test_seed_depth_presets_are_dit_s_width():
    with torch.device("meta"):
        d8, d12 = dit_preset("dit_d8", 3, 32, 100), dit_preset("dit_d12", 3, 32, 100)
    assert (d8.depth, d8.hidden_size, d8.num_heads, d8.patch_size) == (8, 384, 6, 2)
    assert (d12.depth, d12.hidden_size, d12.num_heads) == (12, 384, 6)
    # depth 12 - depth 8 = 4 blocks of 12 d^2 (attention + MLP) + 6 d^2 (adaLN) weights and their biases
    d = 384
    assert sum(p.numel() for p in d12.parameters()) - sum(p.numel() for p in d8.parameters()) == \
        4 * (18 * d * d + 3 * d + d + 4 * d + d + 6 * d)


@pytest.mark.parametrize("name,channels,size", [("dit_mnist", 1, 32), ("dit_latent", 4, 8)])
def test_cpu_presets_keep_the_input_shape(name, channels, size):
    net = dit_preset(name, channels, size, 10).eval()
    x = torch.randn(2, channels, size, size)
    assert net(x, torch.rand(2), torch.tensor([3, -1])).shape == x.shape


def tiny(num_classes: int = 3, channels: int = 4, seed: int = 0, unzero: bool = True) -> DiT:
    torch.manual_seed(seed)
    net = DiT(channels, 8, 2, size=None, depth=2, hidden_size=32, num_heads=2, num_classes=num_classes)
    if unzero:  # adaLN-Zero starts every block as the identity and the output at 0: perturb for contract tests
        for p in net.parameters():
            if not p.any():
                torch.nn.init.normal_(p, std=0.2)
    return net.eval()


def test_fresh_dit_outputs_exactly_zero_and_still_learns():
    net = tiny(unzero=False).train()
    x, t, cond = torch.randn(4, 4, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, -1])
    out = net(x, t, cond)
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: exactly, not approximately
    (out - x).square().mean().backward()
    # the zero output layer gets a gradient (so does the final adaLN once it moves), the blocks start at identity
    assert net.final.linear.weight.grad.abs().sum() > 0
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    assert net(x, t, cond).abs().sum() > 0
    # after a few steps every parameter receives gradient (nothing stays cut off by a zero gate)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (net(x, t, cond) - x).square().mean().backward()
        opt.step()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_null_label_is_the_unconditional_branch():
    net = tiny()
    x, t = torch.randn(3, 4, 8, 8), torch.rand(3)
    with torch.no_grad():
        null, none = net(x, t, torch.full((3,), -1)), net(x, t, None)
        a, b = net(x, t, torch.tensor([0, 1, 2])), net(x, t, torch.tensor([2, 0, 1]))
    torch.testing.assert_close(null, none)
    assert not torch.allclose(a, b) and not torch.allclose(a, null)
    # -1 selects the table's extra row (index num_classes = 3), the row label dropout trains
    assert torch.equal(net.cond_embed(torch.full((3,), -1), 3, "cpu"), net.cond_embed.table.weight[3].expand(3, -1))


def test_cfg_on_every_channel():
    """guided_net at gamma 1 is the conditional DiT, at 0 the unconditional one, and at gamma 3 it moves all 4
    latent channels (the reference forward_with_cfg guides only the first 3)."""
    net = tiny()
    x, t, cond = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        out_c, out_u = net(x, t, cond), net(x, t, None)
        torch.testing.assert_close(guided_net(net, 1.0)(x, t, cond), out_c)
        torch.testing.assert_close(guided_net(net, 0.0)(x, t, cond), out_u, rtol=1e-5, atol=1e-6)
        g3 = guided_net(net, 3.0)(x, t, cond)
    torch.testing.assert_close(g3, out_u + 3.0 * (out_c - out_u), rtol=1e-5, atol=1e-5)
    assert (g3 - out_c)[:, 3].abs().max() > 1e-3  # channel 4 is guided too


def test_patchify_and_unpatchify_keep_the_pixel_order():
    """With the patch conv set to copy each patch's pixels into the token, unpatchify(tokens) is the image."""
    net = DiT(2, 8, 2, size=None, depth=1, hidden_size=8, num_heads=1)
    with torch.no_grad():
        net.patch_embed.weight.zero_()
        net.patch_embed.bias.zero_()
        for i in range(2):  # token channel (p, q, c) = pixel (row p, col q) of channel c: unpatchify's layout
            for j in range(2):
                for c in range(2):
                    net.patch_embed.weight[(i * 2 + j) * 2 + c, c, i, j] = 1.0
    x = torch.randn(3, 2, 8, 8)
    tokens = net.patch_embed(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(net.unpatchify(tokens), x)


def test_position_embedding_is_2d_sincos():
    pe = sincos_pos_embed_2d(8, 4)  # 16 tokens, row-major; 4 channels for the row, 4 for the column
    assert pe.shape == (16, 8)
    row, col = 2, 3
    omega = torch.tensor([1.0, 1e-2])  # 1 / 10000^(i / 2), i = 0, 1
    expect = torch.cat([torch.sin(row * omega), torch.cos(row * omega), torch.sin(col * omega), torch.cos(col * omega)])
    torch.testing.assert_close(pe[row * 4 + col], expect)


def test_bf16_autocast_is_close_to_fp32():
    net = tiny()
    x, t, cond = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, -1])
    with torch.no_grad():
        ref = net(x, t, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, t, cond)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.02


PATHS = {"linear": lambda: SC.LinearSchedule(T=100), "cosine": lambda: SC.CosineSchedule(T=100),
         "rf": SC.LinearPath, "ve": SC.VEPath}
OBJECTIVES = {"eps": O.EpsPrediction, "x0": O.X0Prediction, "v": O.VPrediction, "velocity": O.VelocityPrediction,
              "edm": partial(O.EDMPreconditioned, sigma_data=0.5)}
SAMPLERS = {"ancestral": S.sample_ancestral, "ddim": S.sample_ddim, "euler": S.sample_euler, "heun": S.sample_heun,
            "dpmpp_2m": S.sample_dpmpp_2m, "dpmpp_3m": S.sample_dpmpp_3m, "edm": partial(S.sample_edm, churn=5.0)}


def _valid(p, o):
    return not (p == "rf" and o in ("eps", "edm"))  # singular at alpha = 0: refused by the objective


@pytest.mark.parametrize("pname,oname", [(p, o) for p in PATHS for o in OBJECTIVES if _valid(p, o)])
def test_every_objective_trains_and_every_sampler_runs_with_dit(pname, oname):
    """The net contract with the DiT: each objective's loss back-propagates, each sampler returns finite
    samples of the data's shape with labels and the null label mixed."""
    path = PATHS[pname]()
    obj = OBJECTIVES[oname](path, p_uncond=0.5)
    net = tiny(seed=1).train()
    g = torch.Generator().manual_seed(0)
    x0, cond = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 1, 2, -1])
    loss, _ = obj.loss(net, x0, cond, generator=g)
    loss.mean().backward()
    assert torch.isfinite(loss).all() and net.final.linear.weight.grad.abs().sum() > 0
    net.eval()
    for sname, sampler in SAMPLERS.items():
        if sname == "ancestral" and pname in ("rf", "ve"):
            continue  # ancestral needs a discrete schedule (refused by check_sampler)
        denoise = make_denoiser(guided_net(net, 2.0), obj, cond)
        noise = path.prior_std * torch.randn(4, 4, 8, 8, generator=g)
        with torch.no_grad():
            out = sampler(denoise, path, noise, steps=4, generator=g)
        assert out.shape == x0.shape and torch.isfinite(out).all(), sname


@pytest.mark.parametrize("kwargs,match", [
    (dict(image_size=30, patch_size=4), r"^patch_size=4: must divide image_size=30"),
    (dict(size="XXL"), r"^size=XXL: expected one of S, B, L, XL"),
    (dict(size=None, depth=2), r"^size=null: expected depth, hidden_size and num_heads"),
    (dict(num_heads=5), r"^num_heads=5: must divide hidden_size=384"),
])
def test_bad_arguments_fail_with_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiT(**kwargs)


def test_wrong_input_shape_names_the_expected_one():
    with pytest.raises(ValueError, match=r"DiT expects x of shape \(B, 4, 8, 8\), got \(2, 3, 8, 8\)"):
        tiny()(torch.randn(2, 3, 8, 8), torch.rand(2))
