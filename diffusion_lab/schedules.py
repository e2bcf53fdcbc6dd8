"""Noise paths: stateless alpha(t), sigma(t) and sampling grids.

Convention used everywhere in diffusion_lab: **t = 0 is data, t = 1 is noise**, and

    xt = alpha(t) * x0 + sigma(t) * eps,        eps ~ N(0, I),  t in [0, 1].

Discrete DDPM with T steps lives on the grid t = k / T (k = 0..T) with alpha_bar_k from the beta
table; between grid points log alpha_bar is interpolated linearly so that ODE samplers see a real
derivative while every grid point equals classic DDPM exactly.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


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


def sigmoid_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02, tau: float = 6.0) -> Tensor:
    """Sigmoid beta table (Xu et al., GeoDiff 2022): sigmoid(linspace(-tau, tau, T)) rescaled."""
    return torch.sigmoid(torch.linspace(-tau, tau, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start


class NoisePath(ABC):
    """Base class: a Gaussian path xt = alpha(t) x0 + sigma(t) eps on t in [0, 1]."""

    discrete_T: int | None = None  # number of training timesteps, or None for continuous time

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

    def grid(self, steps: int) -> Tensor:
        """Decreasing sampling times t_0 = 1 > ... > t_steps = 0 (float64, length steps + 1).

        Discrete paths snap to the training grid k / T (evenly respaced steps, Nichol & Dhariwal 2021),
        so `steps == T` visits every training timestep and ancestral sampling is classic DDPM.
        """
        _check_positive_int("steps", steps)
        if self.discrete_T is None:
            return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        if steps > self.discrete_T:
            raise ValueError(f"steps={steps}: expected 1 <= steps <= T={self.discrete_T} for a discrete schedule")
        k = torch.linspace(self.discrete_T, 0, steps + 1, dtype=torch.float64).round()
        return k / self.discrete_T

    def describe(self) -> dict:
        """Plain-dict description stored in results' protocol."""
        return {"name": type(self).__name__, "T": self.discrete_T}


class DiscreteSchedule(NoisePath):
    """DDPM beta table on the grid t = k / T with log alpha_bar interpolated linearly in between."""

    def __init__(self, betas: Tensor, name: str = "discrete"):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas: expected a 1-D table with 0 < beta < 1")
        self.name = name
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

    def _log_alpha_bar(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """log alpha_bar(t) by linear interpolation on the grid, and its (piecewise constant) slope."""
        table = self._table(t.device)
        pos = t.to(torch.float64).clamp(0, 1) * self.discrete_T
        # Segment to the *left* of a grid point (towards data): samplers move t downwards, so the
        # derivative they read at t = k / T is the slope of the step they are about to take.
        lo = (pos.ceil() - 1).clamp(0, self.discrete_T - 1).long()
        frac = pos - lo
        slope = table[lo + 1] - table[lo]  # d log alpha_bar / dk
        return table[lo] + frac * slope, slope * self.discrete_T

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        log_ab, _ = self._log_alpha_bar(t)
        alpha_bar = log_ab.exp()
        return alpha_bar.sqrt().to(t.dtype), (1 - alpha_bar).clamp(min=0).sqrt().to(t.dtype)

    def alpha_sigma_dt(self, t: Tensor) -> tuple[Tensor, Tensor]:
        log_ab, dlog_ab = self._log_alpha_bar(t)
        alpha_bar = log_ab.exp()
        alpha = alpha_bar.sqrt()
        sigma = (1 - alpha_bar).clamp(min=1e-20).sqrt()
        # alpha = exp(log_ab / 2);  sigma = sqrt(1 - exp(log_ab))
        return (0.5 * alpha * dlog_ab).to(t.dtype), (-0.5 * alpha_bar * dlog_ab / sigma).to(t.dtype)

    def describe(self) -> dict:
        return {"name": self.name, "T": self.discrete_T,
                "beta_first": float(self.betas[0]), "beta_last": float(self.betas[-1]),
                "alpha_bar_T": float(self.log_alpha_bar[-1].exp())}


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
                 scale_with_T: bool = False):
        T = _check_positive_int("T", T)
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"beta_start={beta_start}, beta_end={beta_end}: expected 0 < start <= end < 1")
        self.T, self.beta_start, self.beta_end, self.scale_with_T = T, beta_start, beta_end, scale_with_T
        super().__init__(linear_betas(T, *_scaled(T, beta_start, beta_end, scale_with_T)), "linear")


class CosineSchedule(DiscreteSchedule):
    """Cosine schedule (Nichol & Dhariwal 2021), betas clipped at max_beta."""

    def __init__(self, T: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        T = _check_positive_int("T", T)
        if not 0 < max_beta < 1:
            raise ValueError(f"max_beta={max_beta}: expected 0 < max_beta < 1")
        if not s >= 0:
            raise ValueError(f"s={s}: expected an offset >= 0 (Nichol & Dhariwal use 0.008)")
        self.T = T
        super().__init__(cosine_betas(T, s, max_beta), "cosine")


class SigmoidSchedule(DiscreteSchedule):
    """Sigmoid beta schedule (GeoDiff, Xu et al. 2022)."""

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, tau: float = 6.0,
                 scale_with_T: bool = False):
        T = _check_positive_int("T", T)
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"beta_start={beta_start}, beta_end={beta_end}: expected 0 < start <= end < 1")
        self.T = T
        super().__init__(sigmoid_betas(T, *_scaled(T, beta_start, beta_end, scale_with_T), tau), "sigmoid")


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


def broadcast_to(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample vector (B,) so it broadcasts against x (B, ...)."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))
