"""What we measure ourselves against: diffusers (UNet2DModel + its schedulers) and a plain PyTorch loop.

diffusers is a bench-only dependency (`pip install -e '.[bench]'`, done by `make bench`); nothing in
diffusion_lab imports it. The diffusers side is written the way diffusers documents it: the training
step of its `train_unconditional.py` example (DDPMScheduler.add_noise, MSE on the noise, AdamW with
the example's hyper-parameters, grad-norm clipping at 1.0, EMAModel with foreach updates), mixed
precision by autocast (what accelerate does), channels_last as in its speed guide, and the
DDIMScheduler.set_timesteps / step loop of DDIMPipeline for sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from harness import LoopTimer, autocast

T_TRAIN = 1000


def diffusers_unet_config(model_cfg: dict, in_channels: int, image_size: int) -> dict:
    """UNet2DModel kwargs for the same architecture as our DDPM UNet config (diffusion_lab.nets.UNet).

    The mapping is Ho et al.'s: ch * ch_mult -> block_out_channels, num_res_blocks -> layers_per_block,
    attention at the resolutions in attn_resolutions, one-head attention, GroupNorm(32), a mid block with
    attention, zero downsample padding. For the DDPM-CIFAR preset both nets have 35,746,307 parameters.
    """
    mults = list(model_cfg["ch_mult"])
    channels = [model_cfg["ch"] * m for m in mults]
    attn = set(model_cfg.get("attn_resolutions") or [])
    resolutions = [image_size // 2**i for i in range(len(mults))]
    down = ["AttnDownBlock2D" if r in attn else "DownBlock2D" for r in resolutions]
    up = ["AttnUpBlock2D" if r in attn else "UpBlock2D" for r in reversed(resolutions)]
    return dict(sample_size=image_size, in_channels=in_channels, out_channels=in_channels,
                layers_per_block=model_cfg["num_res_blocks"], block_out_channels=tuple(channels),
                down_block_types=tuple(down), up_block_types=tuple(up), dropout=model_cfg.get("dropout", 0.0),
                downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None,
                norm_num_groups=32)


def diffusers_unet(model_cfg: dict, in_channels: int, image_size: int):
    from diffusers import UNet2DModel

    return UNet2DModel(**diffusers_unet_config(model_cfg, in_channels, image_size))


def train_diffusers(model, batches, batch: int, precision: str, channels_last: bool, steps: int, warmup: int,
                    device: str) -> float:
    """img/s of diffusers' train_unconditional step (with EMA and clipping). `batches` yields the same
    {"x": images in [-1, 1]} dicts, on `device`, that our side trains on (ours.ResidentData's loader)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    scheduler = DDPMScheduler(num_train_timesteps=T_TRAIN, beta_schedule="linear")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75,
                   foreach=True)
    ema.to(device)
    timer, data = LoopTimer(device, warmup), iter(batches)
    for i in range(warmup + steps):
        timer.tick(i, batch)
        clean = next(data)["x"]
        if channels_last:
            clean = clean.contiguous(memory_format=torch.channels_last)
        noise = torch.randn_like(clean)
        t = torch.randint(0, T_TRAIN, (batch,), device=device)
        noisy = scheduler.add_noise(clean, noise, t)
        with autocast(device, precision):
            pred = model(noisy, t, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(model.parameters())
    timer.stop()
    return timer.rate


@torch.no_grad()
def sample_diffusers(model, n: int, shape: tuple[int, ...], steps: int, precision: str, channels_last: bool,
                     device: str, seed: int = 0) -> torch.Tensor:
    """DDIMPipeline's loop: set_timesteps(steps), then model -> scheduler.step per timestep (eta = 0)."""
    from diffusers import DDIMScheduler

    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    scheduler = DDIMScheduler(num_train_timesteps=T_TRAIN, beta_schedule="linear")
    scheduler.set_timesteps(steps)
    x = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for t in scheduler.timesteps:
        with autocast(device, precision):
            out = model(x, t).sample
        x = scheduler.step(out, t, x, eta=0.0).prev_sample
    return x


@torch.no_grad()
def sample_diffusers_dpmpp(model, n: int, shape: tuple[int, ...], steps: int, device: str,
                           seed: int = 0) -> torch.Tensor:
    """DPMSolverMultistepScheduler (DPM-Solver++(2M), midpoint, lower-order final, final sigma 0) on the
    trailing grid, the loop of its pipelines: model -> scheduler.step per timestep."""
    from diffusers import DPMSolverMultistepScheduler

    model = model.to(device).eval()
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=T_TRAIN, beta_schedule="linear",
                                            algorithm_type="dpmsolver++", solver_order=2,
                                            timestep_spacing="trailing", final_sigmas_type="zero")
    scheduler.set_timesteps(steps)
    x = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t).sample, t, x).prev_sample
    return x


class NullUNet(torch.nn.Module):
    """A zero-cost stand-in for UNet2DModel (returns zeros): times the sampling loop's own overhead."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, return_dict=True):
        out = torch.zeros_like(x)
        return type("Out", (), {"sample": out})() if return_dict else (out,)


def plain_loop_mnist(root: str, net: torch.nn.Module, precision: str, steps: int, warmup: int, device: str,
                     batch: int = 128, num_workers: int = 0, lr: float = 1e-3) -> float:
    """img/s of the training loop a course starter writes: torchvision MNIST + ToTensor, a shuffling
    DataLoader, per-batch host->device copy, DDPM eps loss (T=300 linear), Adam, loss.item() per step."""
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision import transforms

    data = torchvision.datasets.MNIST(root, train=True, download=True, transform=transforms.ToTensor())
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, num_workers=num_workers,
                        persistent_workers=num_workers > 0, pin_memory=device == "cuda")
    net = net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    betas = torch.linspace(1e-4, 0.02, 300, device=device)
    alpha_bar = torch.cumprod(1 - betas, 0)
    timer, losses, i = LoopTimer(device, warmup), [], 0
    while i < warmup + steps:
        for x, _ in loader:
            if i == warmup + steps:
                break
            timer.tick(i, len(x))
            x = x.to(device) * 2 - 1
            t = torch.randint(0, 300, (len(x),), device=device)
            eps = torch.randn_like(x)
            a = alpha_bar[t].view(-1, 1, 1, 1)
            with autocast(device, precision):
                out = net(a.sqrt() * x + (1 - a).sqrt() * eps, t.float() / 300)
            loss = F.mse_loss(out.float(), eps)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            i += 1
    timer.stop()
    return timer.rate
