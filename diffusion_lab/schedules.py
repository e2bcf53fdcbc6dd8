"""Noise paths: stateless alpha(t), sigma(t) and sampling grids.

Convention used everywhere in diffusion_lab: **t = 0 is data, t = 1 is noise**, and

    xt = alpha(t) * x0 + sigma(t) * eps,        eps ~ N(0, I),  t in [0, 1].

Discrete DDPM with T steps lives on the grid t = k / T (k = 0..T) with alpha_bar_k from the beta
table; between grid points log alpha_bar is interpolated linearly so that ODE samplers see a real
derivative while every grid point equals classic DDPM exactly.

Sampling grids (`NoisePath.grid(steps, spacing)`) are spaced in t, in the noise-to-signal ratio
sigma/alpha (Karras rho-spacing) or in log-SNR; on discrete schedules every grid point is snapped to a
training time k / T (the nearest in log(sigma/alpha)), so the net is only ever asked about times it was
trained on; only the EDM sampler's churn visits times in between (interpolated as above).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

SPACINGS = ("uniform", "leading", "linspace", "karras", "logsnr")


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: expected an integer >= 1")
    return value


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Linear beta table of Ho et al. (2020): torch.linspace(beta_start, beta_end, T)."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule of Nichol & Dhariwal (2021): alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2)."""
    k = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((k / T + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. (2024), Alg. 1: shift and scale sqrt(alpha_bar) so that alpha_bar_T = 0 and alpha_bar_1 is kept."""
    sqrt_ab = torch.log1p(-betas).cumsum(0).mul(0.5).exp()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alpha_bar[0] = first**2  # the shift-and-scale maps the first value to itself; keep it bit-exact
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas  # the last beta is exactly 1: alpha_bar_T = 0


def sigmoid_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02, tau: float = 6.0) -> Tensor:
    """Sigmoid beta table (Xu et al., GeoDiff 2022): sigmoid(linspace(-tau, tau, T)) rescaled."""
    return torch.sigmoid(torch.linspace(-tau, tau, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start


class NoisePath(ABC):
    """Base class: a Gaussian path xt = alpha(t) x0 + sigma(t) eps on t in [0, 1]."""

    discrete_T: int | None = None  # number of training timesteps, or None for continuous time
    prior_std: float = 1.0  # samplers start from N(0, prior_std^2 I) at t = 1 (sigma_max on the VE path)

    @abstractmethod
    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """alpha(t), sigma(t) with the same shape as t."""

    @abstractmethod
    def alpha_sigma_dt(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Time derivatives d alpha/dt, d sigma/dt (used by ODE samplers and velocity targets)."""

    def sample_t(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Training times: uniform on the discrete grid {1/T, ..., 1} or on (0, 1]."""
        if self.discrete_T is not None:
            k = torch.randint(1, self.discrete_T + 1, (n,), generator=generator, device=device)
            return k.float() / self.discrete_T
        u = torch.rand(n, generator=generator, device=device)
        return 1.0 - u  # in (0, 1]: avoids t = 0 where sigma = 0

    def grid(self, steps: int, spacing: str = "uniform", rho: float = 7.0) -> Tensor:
        """Decreasing sampling times t_0 > ... > t_steps = 0 (float64, length steps + 1).

        uniform: evenly spaced in t (on discrete schedules diffusers' "trailing": t_0 = 1, so `steps == T`
        visits every training timestep and ancestral sampling is classic DDPM); leading / linspace:
        diffusers' two other discrete spacings (leading never starts at k = T: Lin et al. 2024, Table 2);
        karras: rho-spacing of sigma/alpha between its extremes (Karras et al. 2022, eq. 5); logsnr:
        evenly spaced log(alpha/sigma) (rho -> infinity). Every grid starts at t_0 = 1 (the prior) except
        leading's, and ends at t = 0.
        """
        _check_positive_int("steps", steps)
        if spacing not in SPACINGS:
            raise ValueError(f"spacing={spacing!r}: expected one of {', '.join(SPACINGS)}")
        if not rho > 0:
            raise ValueError(f"rho={rho}: expected > 0")
        T = self.discrete_T
        if T is not None and steps > T:
            raise ValueError(f"steps={steps}: expected 1 <= steps <= T={T} for a discrete schedule")
        if spacing in ("uniform", "linspace") and T is None:
            return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        if spacing == "uniform":
            return torch.linspace(T, 0, steps + 1, dtype=torch.float64).round() / T
        if spacing in ("leading", "linspace"):
            if T is None:
                raise ValueError("spacing=leading: expected a discrete schedule (it is defined on training indices)")
            # diffusers' index i is our k = i + 1 (its alphas_cumprod[0] is one step of noise).
            if spacing == "leading":
                k = torch.arange(steps, dtype=torch.float64) * (T // steps) + 1
            else:
                k = torch.linspace(0, T - 1, steps, dtype=torch.float64).round() + 1
            return torch.cat([k.flip(0), torch.zeros(1, dtype=torch.float64)]) / T
        lo, hi = (math.log(r) for r in self.ratio_range())
        u = torch.linspace(0, 1, steps, dtype=torch.float64)
        if spacing == "karras":
            log_r = rho * torch.log(math.exp(hi / rho) + u * (math.exp(lo / rho) - math.exp(hi / rho)))
        else:
            log_r = hi + u * (lo - hi)
        t = self.snap(self.t_of_ratio(log_r.exp()))
        t[0] = 1.0  # the prior's time, also where sigma/alpha is infinite (rectified flow, zero terminal SNR)
        return torch.cat([t, torch.zeros(1, dtype=torch.float64)])

    def ratio(self, t: Tensor) -> Tensor:
        """Noise-to-signal ratio sigma(t) / alpha(t) (EDM's sigma of the scaled variable x / alpha), float64."""
        alpha, sigma = self.alpha_sigma(torch.as_tensor(t, dtype=torch.float64))
        return sigma / alpha

    def ratio_range(self) -> tuple[float, float]:
        """Smallest and largest finite sigma/alpha that Karras and log-SNR grids span."""
        lo, hi = self.ratio(torch.tensor([1e-3, 1 - 1e-3], dtype=torch.float64)).tolist()
        return lo, hi

    def t_of_ratio(self, ratio: Tensor) -> Tensor:
        """Inverse of `ratio` by bisection (sigma/alpha increases with t on every path here); clamps to [0, 1]."""
        target = torch.as_tensor(ratio, dtype=torch.float64)
        lo, hi = torch.zeros_like(target), torch.ones_like(target)
        for _ in range(60):  # 2^-60: below float64 resolution of t
            mid = (lo + hi) / 2
            above = self.ratio(mid) > target
            lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
        return hi

    def snap(self, t: Tensor) -> Tensor:
        """Continuous paths: t unchanged. Discrete ones override this to land on training times."""
        return t

    def describe(self) -> dict:
        """Plain-dict description stored in results' protocol."""
        return {"name": type(self).__name__, "T": self.discrete_T}


class DiscreteSchedule(NoisePath):
    """DDPM beta table on the grid t = k / T with log alpha_bar interpolated linearly in between.

    zero_terminal_snr rescales the table (Lin et al. 2024) so alpha_bar_T = 0; log alpha_bar is -inf
    there, so on the last segment alpha itself is interpolated linearly (it reaches 0 at t = 1).
    """

    def __init__(self, betas: Tensor, name: str = "discrete", zero_terminal_snr: bool = False):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas: expected a 1-D table with 0 < beta < 1")
        if zero_terminal_snr:
            if betas.numel() < 2:
                raise ValueError("zero_terminal_snr=true: expected T >= 2")
            betas = rescale_zero_terminal_snr(betas)
        self.name, self.zero_terminal_snr = name, bool(zero_terminal_snr)
        self.discrete_T = betas.numel()
        self.betas = betas
        # log alpha_bar_k for k = 0..T; k = 0 is clean data (alpha_bar = 1).
        self.log_alpha_bar = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log1p(-betas).cumsum(0)])
        self._cache: dict = {}

    def _table(self, device) -> Tensor:
        # Keep a float64 copy per device: schedule maths in float64 avoids drift over 1000 steps.
        if device not in self._cache:
            self._cache[device] = self.log_alpha_bar.to(device)
        return self._cache[device]

    def _log_alpha_bar(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """log alpha_bar(t) by linear interpolation on the grid, its (piecewise constant) slope, and k = tT."""
        table = self._table(t.device)
        pos = t.to(torch.float64).clamp(0, 1) * self.discrete_T
        # Segment to the *left* of a grid point (towards data): samplers move t downwards, so the
        # derivative they read at t = k / T is the slope of the step they are about to take.
        lo = (pos.ceil() - 1).clamp(0, self.discrete_T - 1).long()
        frac = pos - lo
        slope = table[lo + 1] - table[lo]  # d log alpha_bar / dk
        return table[lo] + frac * slope, slope * self.discrete_T, pos

    def _last_segment(self, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Zero terminal SNR: alpha linear from alpha_{T-1} to 0 on (T-1, T]; mask, alpha, d alpha / dt."""
        T = self.discrete_T
        a_prev = float(self.log_alpha_bar[T - 1].mul(0.5).exp())
        mask = pos > T - 1 if self.zero_terminal_snr else torch.zeros_like(pos, dtype=torch.bool)
        return mask, a_prev * (T - pos), torch.full_like(pos, -a_prev * T)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        log_ab, _, pos = self._log_alpha_bar(t)
        alpha_bar = log_ab.exp()
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).clamp(min=0).sqrt()
        if self.zero_terminal_snr:
            mask, a_last, _ = self._last_segment(pos)
            alpha = torch.where(mask, a_last, alpha)
            sigma = torch.where(mask, (1 - a_last**2).sqrt(), sigma)
        return alpha.to(t.dtype), sigma.to(t.dtype)

    def alpha_sigma_dt(self, t: Tensor) -> tuple[Tensor, Tensor]:
        log_ab, dlog_ab, pos = self._log_alpha_bar(t)
        alpha_bar = log_ab.exp()
        alpha = alpha_bar.sqrt()
        sigma = (1 - alpha_bar).clamp(min=1e-20).sqrt()
        # alpha = exp(log_ab / 2);  sigma = sqrt(1 - exp(log_ab))
        d_alpha, d_sigma = 0.5 * alpha * dlog_ab, -0.5 * alpha_bar * dlog_ab / sigma
        if self.zero_terminal_snr:
            mask, a_last, da_last = self._last_segment(pos)
            d_alpha = torch.where(mask, da_last, d_alpha)
            d_sigma = torch.where(mask, -a_last * da_last / (1 - a_last**2).clamp(min=1e-20).sqrt(), d_sigma)
        return d_alpha.to(t.dtype), d_sigma.to(t.dtype)

    def ratio_range(self) -> tuple[float, float]:
        T = self.discrete_T
        r = self.ratio(torch.tensor([1 / T, 1.0, (T - 1) / T], dtype=torch.float64)).tolist()
        return r[0], r[1] if math.isfinite(r[1]) else r[2]

    def snap(self, t: Tensor) -> Tensor:
        """The training time k / T (k >= 1) nearest to t in log(sigma/alpha)."""
        T = self.discrete_T
        k_lo = (t * T).floor().clamp(1, T)
        k_hi = (k_lo + 1).clamp(max=T)
        target = self.ratio(t).log()
        pick_hi = (self.ratio(k_hi / T).log() - target).abs() < (self.ratio(k_lo / T).log() - target).abs()
        return torch.where(pick_hi, k_hi, k_lo) / T

    def grid(self, steps: int, spacing: str = "uniform", rho: float = 7.0) -> Tensor:
        ts = super().grid(steps, spacing, rho)
        if spacing not in ("karras", "logsnr"):
            return ts
        # Snapping can map neighbouring Karras points to one k (dense near sigma_min): push them
        # apart to keep `steps` distinct training times (possible since steps <= T).
        k = (ts * self.discrete_T).round().long().tolist()
        for i in range(steps - 2, 0, -1):
            k[i] = max(k[i], k[i + 1] + 1)
        for i in range(1, steps):
            k[i] = min(k[i], k[i - 1] - 1)
        return torch.tensor(k, dtype=torch.float64) / self.discrete_T

    def describe(self) -> dict:
        return {"name": self.name, "T": self.discrete_T,
                "beta_first": float(self.betas[0]), "beta_last": float(self.betas[-1]),
                "alpha_bar_T": float(self.log_alpha_bar[-1].exp()),
                **({"zero_terminal_snr": True} if self.zero_terminal_snr else {})}


def _scaled(T: int, beta_start: float, beta_end: float, scale_with_T: bool) -> tuple[float, float]:
    # Nichol & Dhariwal: scale the 1000-step endpoints by 1000 / T so that short schedules still
    # reach (almost) pure noise; the classic DDPM/CSE849 recipes keep them fixed.
    if not scale_with_T:
        return beta_start, beta_end
    scale = 1000.0 / T
    return beta_start * scale, min(beta_end * scale, 0.999)


class LinearSchedule(DiscreteSchedule):
    """DDPM linear beta schedule (Ho et al. 2020)."""

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 scale_with_T: bool = False, zero_terminal_snr: bool = False):
        T = _check_positive_int("T", T)
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"beta_start={beta_start}, beta_end={beta_end}: expected 0 < start <= end < 1")
        self.T, self.beta_start, self.beta_end, self.scale_with_T = T, beta_start, beta_end, scale_with_T
        super().__init__(linear_betas(T, *_scaled(T, beta_start, beta_end, scale_with_T)), "linear", zero_terminal_snr)


class CosineSchedule(DiscreteSchedule):
    """Cosine schedule (Nichol & Dhariwal 2021), betas clipped at max_beta."""

    def __init__(self, T: int = 1000, s: float = 0.008, max_beta: float = 0.999, zero_terminal_snr: bool = False):
        T = _check_positive_int("T", T)
        if not 0 < max_beta < 1:
            raise ValueError(f"max_beta={max_beta}: expected 0 < max_beta < 1")
        if not s >= 0:
            raise ValueError(f"s={s}: expected an offset >= 0 (Nichol & Dhariwal use 0.008)")
        self.T = T
        super().__init__(cosine_betas(T, s, max_beta), "cosine", zero_terminal_snr)


class SigmoidSchedule(DiscreteSchedule):
    """Sigmoid beta schedule (GeoDiff, Xu et al. 2022)."""

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, tau: float = 6.0,
                 scale_with_T: bool = False, zero_terminal_snr: bool = False):
        T = _check_positive_int("T", T)
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"beta_start={beta_start}, beta_end={beta_end}: expected 0 < start <= end < 1")
        self.T = T
        super().__init__(sigmoid_betas(T, *_scaled(T, beta_start, beta_end, scale_with_T), tau), "sigmoid",
                         zero_terminal_snr)


class LinearPath(NoisePath):
    """Rectified-flow / flow-matching path (Liu et al. 2022; Lipman et al. 2023): alpha = 1 - t, sigma = t."""

    def __init__(self, t_min: float = 0.0):
        if not 0 <= t_min < 1:
            raise ValueError(f"t_min={t_min}: expected 0 <= t_min < 1")
        self.t_min = t_min

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return 1 - t, t

    def alpha_sigma_dt(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return -torch.ones_like(t), torch.ones_like(t)

    def sample_t(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        t = super().sample_t(n, generator, device)
        return self.t_min + (1 - self.t_min) * t

    def describe(self) -> dict:
        return {"name": "linear_path", "T": None, "t_min": self.t_min}


class VEPath(NoisePath):
    """EDM's variance-exploding path (Karras et al. 2022, Table 1): alpha = 1, sigma = sigma_max * t.

    sigma linear in t makes the ODE in t the ODE in sigma that EDM integrates, so Heun / Euler here are
    EDM's; the prior is N(0, sigma_max^2 I). sigma_min is where Karras / log-SNR grids end before t = 0.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"sigma_min={sigma_min}, sigma_max={sigma_max}: expected 0 < sigma_min < sigma_max")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.prior_std = self.sigma_max

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(t), self.sigma_max * t

    def alpha_sigma_dt(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(t), torch.full_like(t, self.sigma_max)

    def ratio_range(self) -> tuple[float, float]:
        return self.sigma_min, self.sigma_max

    def t_of_ratio(self, ratio: Tensor) -> Tensor:
        return (torch.as_tensor(ratio, dtype=torch.float64) / self.sigma_max).clamp(0, 1)

    def describe(self) -> dict:
        return {"name": "ve", "T": None, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


def broadcast_to(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample vector (B,) so it broadcasts against x (B, ...)."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))
