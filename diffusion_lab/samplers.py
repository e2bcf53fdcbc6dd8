"""Samplers: one pure function per solver over the denoiser contract.

    denoise(xt, t) -> (x0_hat, eps_hat)      t: shape (B,), t = 1 noise, t = 0 data

No sampler knows which objective trained the net: `make_denoiser` adapts (net, objective), and
guidance is a wrapper around the net (see `guided_net`). Schedule coefficients for the whole grid are
computed once, in float64, before each loop; randomness comes only from the explicit `generator`.
Every sampler takes `spacing` (schedules.SPACINGS), starts from the path's prior N(0, prior_std^2) and
declares its net evaluations per `steps` (`nfe`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffusion_lab.schedules import NoisePath

Denoiser = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
StepCallback = Callable[[int, float, Tensor], None]  # (step index, t after the step, x after the step)


def declares_nfe(count: Callable[[int], int]):
    """Decorator: the sampler's net evaluations as a function of `steps`, read by `nfe`."""

    def mark(fn):
        fn.nfe = count
        return fn

    return mark


def make_denoiser(net, objective, cond: Tensor | None = None) -> Denoiser:
    """Wrap a net trained with `objective` into denoise(xt, t) -> (x0_hat, eps_hat)."""

    def denoise(xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        out = net(*objective.net_inputs(xt, t), cond)
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


def _coefficients(path: NoisePath, steps: int,
                  spacing: str = "uniform") -> tuple[list[float], list[float], list[float]]:
    """Grid times and alpha/sigma on them as python floats (computed once per sampling call)."""
    ts = path.grid(steps, spacing)
    alpha, sigma = path.alpha_sigma(ts)
    return ts.tolist(), alpha.tolist(), sigma.tolist()


def _prior(path: NoisePath, noise: Tensor) -> Tensor:
    """x at t = 1 from standard normal noise: N(0, I) on VP / flow paths, N(0, sigma_max^2 I) on VE."""
    return noise if path.prior_std == 1.0 else noise * path.prior_std


def _time(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)


def _noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@declares_nfe(lambda steps: steps)
@torch.no_grad()
def sample_ancestral(denoise: Denoiser, path: NoisePath, noise: Tensor, steps: int,
                     generator: torch.Generator | None = None, variance: str = "small",
                     callback: StepCallback | None = None, spacing: str = "uniform") -> Tensor:
    """DDPM ancestral sampling from the Gaussian posterior q(x_s | x_t, x0_hat) (Ho et al. 2020, eq. 6-7).

    With respaced steps (steps < T) this is Nichol & Dhariwal's respacing. `variance`: "small" is the
    posterior variance beta_tilde, "large" is beta (the two choices of Ho et al.).
    """
    if variance not in ("small", "large"):
        raise ValueError(f"variance={variance!r}: expected 'small' or 'large'")
    ts, alphas, sigmas = _coefficients(path, steps, spacing)
    x = _prior(path, noise)
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


@declares_nfe(lambda steps: steps)
@torch.no_grad()
def sample_ddim(denoise: Denoiser, path: NoisePath, noise: Tensor, steps: int, eta: float = 0.0,
                generator: torch.Generator | None = None, callback: StepCallback | None = None,
                spacing: str = "uniform") -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z.

    c = eta * (posterior std); eta = 0 is the deterministic ODE-like sampler, eta = 1 equals ancestral.
    """
    if not 0 <= eta <= 1:
        raise ValueError(f"eta={eta}: expected 0 <= eta <= 1")
    ts, alphas, sigmas = _coefficients(path, steps, spacing)
    x = _prior(path, noise)
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


@declares_nfe(lambda steps: steps)
@torch.no_grad()
def sample_euler(denoise: Denoiser, path: NoisePath, noise: Tensor, steps: int,
                 callback: StepCallback | None = None, generator: torch.Generator | None = None,
                 spacing: str = "uniform") -> Tensor:
    """Euler integration of the probability-flow ODE from t = 1 to t = 0 (deterministic)."""
    ts = path.grid(steps, spacing).tolist()
    x = _prior(path, noise)
    for i in range(steps):
        x = x + (ts[i + 1] - ts[i]) * _velocity(denoise, path, x, ts[i])
        if callback is not None:
            callback(i, ts[i + 1], x)
    return x


def _heun_step(denoise: Denoiser, path: NoisePath, x: Tensor, t: float, s: float) -> Tensor:
    """One Heun step t -> s of the probability-flow ODE; plain Euler when s = 0 (no drift at the data end)."""
    v = _velocity(denoise, path, x, t)
    x_next = x + (s - t) * v
    if s > 0:  # sigma(0) = 0: the drift is not evaluated at the data end
        x_next = x + (s - t) * 0.5 * (v + _velocity(denoise, path, x_next, s))
    return x_next


@declares_nfe(lambda steps: 2 * steps - 1)
@torch.no_grad()
def sample_heun(denoise: Denoiser, path: NoisePath, noise: Tensor, steps: int,
                callback: StepCallback | None = None, generator: torch.Generator | None = None,
                spacing: str = "uniform") -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); the last step to t = 0 is plain Euler."""
    ts = path.grid(steps, spacing).tolist()
    x = _prior(path, noise)
    for i in range(steps):
        x = _heun_step(denoise, path, x, ts[i], ts[i + 1])
        if callback is not None:
            callback(i, ts[i + 1], x)
    return x


@declares_nfe(lambda steps: 2 * steps - 1)
@torch.no_grad()
def sample_edm(denoise: Denoiser, path: NoisePath, noise: Tensor, steps: int, churn: float = 0.0,
               s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0, spacing: str = "karras",
               generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """EDM stochastic sampler (Karras et al. 2022, Alg. 2): Heun steps after raising the noise level.

    Where s_tmin <= sigma/alpha <= s_tmax the step first moves up to t_hat with sigma/alpha scaled by
    1 + gamma, gamma = min(churn / steps, sqrt(2) - 1), drawing the exact forward transition
    q(x_t_hat | x_t) (on EDM's VE path: x + sqrt(s_hat^2 - s^2) s_noise z). churn = 0 is Heun. The
    path ends at t = 1, so t_hat is clamped there and the first step (already at the prior) has no churn.
    """
    for name, value in (("churn", churn), ("s_tmin", s_tmin), ("s_noise", s_noise)):
        if not value >= 0:
            raise ValueError(f"{name}={value}: expected >= 0")
    if not s_tmax >= s_tmin:
        raise ValueError(f"s_tmax={s_tmax}: expected >= s_tmin={s_tmin}")
    ts = path.grid(steps, spacing).tolist()
    gamma = min(churn / steps, math.sqrt(2) - 1)
    x = _prior(path, noise)
    for i in range(steps):
        t, s = ts[i], ts[i + 1]
        ratio = float(path.ratio(torch.tensor(t, dtype=torch.float64)))
        if gamma > 0 and s_tmin <= ratio <= s_tmax and t < 1:
            t_hat = float(path.t_of_ratio(torch.tensor(ratio * (1 + gamma), dtype=torch.float64)))
            (a_t, a_h), (s_t, s_h) = path.alpha_sigma(torch.tensor([t, t_hat], dtype=torch.float64))
            k = float(a_h / a_t)
            std = s_noise * math.sqrt(max(float(s_h) ** 2 - k**2 * float(s_t) ** 2, 0.0))
            x = k * x + std * _noise_like(x, generator)
            t = t_hat
        x = _heun_step(denoise, path, x, t, s)
        if callback is not None:
            callback(i, s, x)
    return x


def _dpmpp_increment(x0_hat: Tensor, past: list[tuple[Tensor, float]], h: float) -> Tensor:
    """int e^-(lambda_s - l) x0(l) dl / e^0 over one step, x0 extrapolated from the past (h: this step).

    past holds (x0_hat, h of the step that followed it), oldest first: none is DPM-Solver++ 1 (= DDIM),
    one is 2M's D = (1 + 1/2r) x0_i - (1/2r) x0_{i-1}, r = h_{i-1} / h; two is the 3rd-order update
    from divided differences of x0_hat in lambda.
    """
    phi1 = -math.expm1(-h)  # 1 - e^-h
    if not past:
        return phi1 * x0_hat
    m1, h1 = past[-1]
    r0 = h1 / h
    d1_0 = (x0_hat - m1) / r0
    if len(past) == 1:
        return phi1 * (x0_hat + d1_0 / 2)
    m2, h2 = past[-2]
    r1 = h2 / h
    d1_1 = (m1 - m2) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)  # = h x0'(lambda_t) for quadratic x0(lambda)
    # = h^2 x0''. DPM-Solver's and k-diffusion's code use half of this, which keeps the update only
    # second order; with the full term the error falls 8x per halved step (tests/test_solvers.py).
    d2 = 2 * (d1_0 - d1_1) / (r0 + r1)
    # Taylor terms of int_0^h e^-(h-u) x0(lambda_t + u) du: phi1 x0 + (h - phi1) x0' + (h^2/2 - h + phi1) x0''.
    return phi1 * x0_hat + (1 - phi1 / h) * d1 + (0.5 - (h - phi1) / h**2) * d2


def _dpmpp_multistep(denoise: Denoiser, path: NoisePath, noise: Tensor, steps: int, order: int, spacing: str,
                     callback: StepCallback | None) -> Tensor:
    """DPM-Solver++ multistep in data-prediction form (Lu et al. 2022, Alg. 2; 3rd order as in their code).

    With lambda = ln(alpha / sigma) and h = lambda_s - lambda_t, the exponential integrator gives
    x_s = (sigma_s / sigma_t) x_t + alpha_s * increment; orders build up from 1 as the history fills, the
    step before the last is at most second order, and the last step to sigma = 0 is first order
    (x = x0_hat), as in the paper and k-diffusion.
    """
    ts, alphas, sigmas = _coefficients(path, steps, spacing)
    # lambda = -inf where alpha = 0 (t = 1 of rectified flow / zero terminal SNR): that first step is
    # exact with x0_hat alone, and its infinite h gives no slope to later steps.
    lams = [math.log(a / s) if a > 0 and s > 0 else (-math.inf if a == 0 else math.inf)
            for a, s in zip(alphas, sigmas)]
    x = _prior(path, noise)
    past: list[tuple[Tensor, float]] = []
    for i in range(steps):
        x0_hat, _ = denoise(x, _time(x, ts[i]))
        if sigmas[i + 1] == 0:
            x = alphas[i + 1] * x0_hat
        else:
            h = lams[i + 1] - lams[i]
            # At most second order on the step before the last (diffusers' lower_order_final): that step
            # ends near sigma_min and is far longer in lambda than the ones before it, where a quadratic
            # extrapolation of x0_hat over the history overshoots.
            usable = past if i < steps - 2 else past[-1:]
            x = (sigmas[i + 1] / sigmas[i]) * x + alphas[i + 1] * _dpmpp_increment(x0_hat, usable, h)
            if math.isfinite(h):
                past = (past + [(x0_hat, h)])[-(order - 1):]
        if callback is not None:
            callback(i, ts[i + 1], x)
    return x


@declares_nfe(lambda steps: steps)
@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoiser, path: NoisePath, noise: Tensor, steps: int, spacing: str = "uniform",
                    generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep, one net evaluation per step."""
    return _dpmpp_multistep(denoise, path, noise, steps, 2, spacing, callback)


@declares_nfe(lambda steps: steps)
@torch.no_grad()
def sample_dpmpp_3m(denoise: Denoiser, path: NoisePath, noise: Tensor, steps: int, spacing: str = "uniform",
                    generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """DPM-Solver++(3M): third-order multistep in data-prediction form (Lu et al. 2022's exponential integrator)."""
    return _dpmpp_multistep(denoise, path, noise, steps, 3, spacing, callback)


def sampler_name(sampler) -> str:
    """`sample_ddim` or a functools.partial of it -> "ddim" (the name in results, logs and reports)."""
    return getattr(getattr(sampler, "func", sampler), "__name__", "sampler").removeprefix("sample_")


def nfe(sampler, steps: int) -> int:
    """Number of net evaluations a sampler spends for `steps`, as the sampler declares (`declares_nfe`)."""
    fn = getattr(sampler, "func", sampler)
    count = getattr(fn, "nfe", None)
    if count is None:
        raise ValueError(f"sampler {getattr(fn, '__name__', fn)!r} does not declare its NFE (@declares_nfe)")
    return count(steps)
