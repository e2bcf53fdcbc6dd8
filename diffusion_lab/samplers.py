"""Samplers: one pure function per solver over the denoiser contract.

    denoise(xt, t) -> (x0_hat, eps_hat)      t: shape (B,), t = 1 noise, t = 0 data

No sampler knows which objective trained the net: `make_denoiser` adapts (net, objective), and
guidance is a wrapper around the net (see `guided_net`). Schedule coefficients for the whole grid are
computed once, in float64, before each loop; randomness comes only from the explicit `generator`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffusion_lab.schedules import NoisePath

Denoiser = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
StepCallback = Callable[[int, float, Tensor], None]  # (step index, t after the step, x after the step)


def make_denoiser(net, objective, cond: Tensor | None = None) -> Denoiser:
    """Wrap a net trained with `objective` into denoise(xt, t) -> (x0_hat, eps_hat)."""

    def denoise(xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        out = net(xt, t, cond)
        return objective.to_x0_eps(out.to(torch.promote_types(out.dtype, xt.dtype)), xt, t)

    return denoise


def guided_net(net, scale: float):
    """Classifier-free guidance (Ho & Salimans 2022): out_u + scale * (out_c - out_u), one batched forward.

    Every to_x0_eps is affine in the output, so guiding the output guides x0_hat and eps_hat alike.
    scale = 1 is the conditional model, scale = 0 the unconditional one.
    """

    def forward(xt: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        if cond is None or scale == 1.0:
            return net(xt, t, cond)
        null = torch.full_like(cond, -1)
        out = net(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([cond, null]))
        out = out.to(torch.promote_types(out.dtype, torch.float32))  # combine in >= fp32 under autocast
        out_c, out_u = out.chunk(2)
        return out_u + scale * (out_c - out_u)

    return forward


def classifier_guided(denoise: Denoiser, classifier, cond: Tensor, scale: float, path: NoisePath,
                      chunk: int = 4096) -> Denoiser:
    """Classifier guidance (Dhariwal & Nichol 2021): eps_hat - scale * sigma(t) * grad log p(cond | xt, t).

    x0_hat moves consistently (xt = alpha x0_hat + sigma eps_hat still holds), so every sampler and
    every objective can use it. The gradient is taken in chunks of `chunk` rows to bound memory; rows
    labelled -1 (NULL_CLASS) get no guidance.
    """

    def guided(xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        x0_hat, eps_hat = denoise(xt, t)
        grads = []
        with torch.enable_grad():
            for sl in torch.split(torch.arange(xt.shape[0], device=xt.device), chunk):
                x = xt[sl].detach().requires_grad_(True)
                logp = torch.log_softmax(classifier(x, t[sl]).float(), dim=-1)
                c = cond[sl].long()[:, None]
                picked = (logp.gather(1, c.clamp(min=0)) * (c >= 0)).sum()  # label -1: unguided row
                grads.append(torch.autograd.grad(picked, x)[0])
        grad = torch.cat(grads).to(eps_hat.dtype)
        alpha, sigma = (v.to(eps_hat.dtype).reshape(-1, *[1] * (xt.ndim - 1)) for v in path.alpha_sigma(t))
        eps_new = eps_hat - scale * sigma * grad
        return x0_hat + scale * sigma**2 / alpha.clamp(min=1e-8) * grad, eps_new

    return guided


def _coefficients(path: NoisePath, steps: int) -> tuple[list[float], list[float], list[float]]:
    """Grid times and alpha/sigma on them as python floats (computed once per sampling call)."""
    ts = path.grid(steps)
    alpha, sigma = path.alpha_sigma(ts)
    return ts.tolist(), alpha.tolist(), sigma.tolist()


def _time(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)


def _noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def sample_ancestral(denoise: Denoiser, path: NoisePath, noise: Tensor, steps: int,
                     generator: torch.Generator | None = None, variance: str = "small",
                     callback: StepCallback | None = None) -> Tensor:
    """DDPM ancestral sampling from the Gaussian posterior q(x_s | x_t, x0_hat) (Ho et al. 2020, eq. 6-7).

    With respaced steps (steps < T) this is Nichol & Dhariwal's respacing. `variance`: "small" is the
    posterior variance beta_tilde, "large" is beta (the two choices of Ho et al.).
    """
    if variance not in ("small", "large"):
        raise ValueError(f"variance={variance!r}: expected 'small' or 'large'")
    ts, alphas, sigmas = _coefficients(path, steps)
    x = noise
    for i in range(steps):
        (t, a_t, s_t), (s, a_s, s_s) = (ts[i], alphas[i], sigmas[i]), (ts[i + 1], alphas[i + 1], sigmas[i + 1])
        x0_hat, _ = denoise(x, _time(x, t))
        a_ts = a_t / a_s
        var_ts = s_t**2 - a_ts**2 * s_s**2  # variance of q(x_t | x_s): beta_t for one DDPM step
        mean = (a_ts * s_s**2 / s_t**2) * x + (a_s * var_ts / s_t**2) * x0_hat
        var = var_ts * s_s**2 / s_t**2 if variance == "small" else var_ts
        x = mean + math.sqrt(var) * _noise_like(x, generator) if s > 0 else mean
        if callback is not None:
            callback(i, s, x)
    return x


@torch.no_grad()
def sample_ddim(denoise: Denoiser, path: NoisePath, noise: Tensor, steps: int, eta: float = 0.0,
                generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z.

    c = eta * (posterior std); eta = 0 is the deterministic ODE-like sampler, eta = 1 equals ancestral.
    """
    if not 0 <= eta <= 1:
        raise ValueError(f"eta={eta}: expected 0 <= eta <= 1")
    ts, alphas, sigmas = _coefficients(path, steps)
    x = noise
    for i in range(steps):
        t, a_t, s_t, a_s, s_s = ts[i], alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]
        x0_hat, eps_hat = denoise(x, _time(x, t))
        c = eta * math.sqrt(max(s_t**2 - (a_t / a_s) ** 2 * s_s**2, 0.0)) * s_s / s_t
        x = a_s * x0_hat + math.sqrt(max(s_s**2 - c**2, 0.0)) * eps_hat
        if c > 0:
            x = x + c * _noise_like(x, generator)
        if callback is not None:
            callback(i, ts[i + 1], x)
    return x


def _velocity(denoise: Denoiser, path: NoisePath, x: Tensor, t: float) -> Tensor:
    """Probability-flow ODE drift dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat (any Gaussian path)."""
    tt = _time(x, t)
    x0_hat, eps_hat = denoise(x, tt)
    d_alpha, d_sigma = path.alpha_sigma_dt(torch.tensor([t], dtype=torch.float64))
    return float(d_alpha) * x0_hat + float(d_sigma) * eps_hat


@torch.no_grad()
def sample_euler(denoise: Denoiser, path: NoisePath, noise: Tensor, steps: int,
                 callback: StepCallback | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Euler integration of the probability-flow ODE from t = 1 to t = 0 (deterministic)."""
    ts = path.grid(steps).tolist()
    x = noise
    for i in range(steps):
        x = x + (ts[i + 1] - ts[i]) * _velocity(denoise, path, x, ts[i])
        if callback is not None:
            callback(i, ts[i + 1], x)
    return x


@torch.no_grad()
def sample_heun(denoise: Denoiser, path: NoisePath, noise: Tensor, steps: int,
                callback: StepCallback | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); the last step to t = 0 is plain Euler."""
    ts = path.grid(steps).tolist()
    x = noise
    for i in range(steps):
        t, s = ts[i], ts[i + 1]
        v = _velocity(denoise, path, x, t)
        x_next = x + (s - t) * v
        if s > 0:  # sigma(0) = 0: the drift is not evaluated at the data end
            x_next = x + (s - t) * 0.5 * (v + _velocity(denoise, path, x_next, s))
        x = x_next
        if callback is not None:
            callback(i, s, x)
    return x


def nfe(sampler, steps: int) -> int:
    """Number of net evaluations a sampler spends for `steps` (Heun: 2 per step but the last)."""
    fn = getattr(sampler, "func", sampler)
    return 2 * steps - 1 if fn is sample_heun else steps
