"""Training-time choices of an objective: how the per-sample loss is weighted and how t is drawn.

A weighting states the weight it wants on the *x0 error* ||x0_hat - x0||^2; the objective's own output
error is w_out(t) * ||x0_hat - x0||^2 (every to_x0_eps is affine in the output), so the factor applied
to the output-space loss is wanted / w_out. That one rule gives min-SNR's per-target formulas
(eps: min(SNR, g) / SNR, x0: min(SNR, g), v: min(SNR, g) / (SNR + 1)) without a switch on the target.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from diffusion_lab.schedules import NoisePath


class UniformWeighting:
    """Plain mean squared error on the net's output (Ho et al. 2020's simple loss)."""

    name = "uniform"

    def __call__(self, objective, t: Tensor) -> Tensor | None:
        return None  # no multiply at all: identical numbers to the unweighted loss

    def describe(self) -> dict:
        return {"name": self.name}


class _X0Weighting(ABC):
    """Base: weight = wanted x0-space weight / the objective's output-to-x0 factor. Subclasses (MinSNRWeighting,
    EDMWeighting) state `wanted`; the base itself is never instantiated."""

    name = "x0"

    @abstractmethod
    def wanted(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """The weight on ||x0_hat - x0||^2 at (alpha(t), sigma(t))."""

    def __call__(self, objective, t: Tensor) -> Tensor:
        alpha, sigma = objective.schedule.alpha_sigma(t.to(torch.float64))
        return (self.wanted(alpha, sigma) / objective.x0_error_factor(t)).float()


class MinSNRWeighting(_X0Weighting):
    """Min-SNR-gamma (Hang et al. 2023): x0-space weight min(SNR(t), gamma), SNR = alpha^2 / sigma^2."""

    name = "min_snr"

    def __init__(self, gamma: float = 5.0):
        if not gamma > 0:
            raise ValueError(f"gamma={gamma}: expected > 0")
        self.gamma = float(gamma)

    def wanted(self, alpha, sigma):
        return ((alpha / sigma) ** 2).clamp(max=self.gamma)

    def describe(self) -> dict:
        return {"name": self.name, "gamma": self.gamma}


class EDMWeighting(_X0Weighting):
    """EDM (Karras et al. 2022, eq. 8 / Table 1): x0-space weight (s^2 + sd^2) / (s sd)^2, s = sigma / alpha."""

    name = "edm"

    def __init__(self, sigma_data: float = 0.5):
        if not sigma_data > 0:
            raise ValueError(f"sigma_data={sigma_data}: expected > 0")
        self.sigma_data = float(sigma_data)

    def wanted(self, alpha, sigma):
        s, sd = sigma / alpha, self.sigma_data
        return (s**2 + sd**2) / (s * sd) ** 2

    def describe(self) -> dict:
        return {"name": self.name, "sigma_data": self.sigma_data}


class UniformTime:
    """The path's own training times: uniform on {1/T, ..., 1} (discrete) or on (0, 1]."""

    name = "uniform"

    def __call__(self, path: NoisePath, n: int, generator=None, device=None) -> Tensor:
        return path.sample_t(n, generator=generator, device=device)

    def describe(self) -> dict:
        return {"name": self.name}


class LogitNormalTime:
    """Logit-normal t (Esser et al. 2024, SD3): t = sigmoid(m + s n); snapped to training times if discrete."""

    name = "logit_normal"

    def __init__(self, m: float = 0.0, s: float = 1.0):
        if not s > 0:
            raise ValueError(f"s={s}: expected > 0")
        self.m, self.s = float(m), float(s)

    def __call__(self, path: NoisePath, n: int, generator=None, device=None) -> Tensor:
        z = torch.randn(n, generator=generator, device=device)
        return _on_training_times(path, torch.sigmoid(self.m + self.s * z))

    def describe(self) -> dict:
        return {"name": self.name, "m": self.m, "s": self.s}


class LogNormalTime:
    """EDM's noise levels (Karras et al. 2022, Table 1): ln(sigma/alpha) ~ N(p_mean, p_std^2), mapped to t."""

    name = "lognormal"

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        if not p_std > 0:
            raise ValueError(f"p_std={p_std}: expected > 0")
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def __call__(self, path: NoisePath, n: int, generator=None, device=None) -> Tensor:
        z = torch.randn(n, generator=generator, device=device)
        ratio = (self.p_mean + self.p_std * z.to(torch.float64)).exp()
        return _on_training_times(path, path.t_of_ratio(ratio).to(z.dtype))

    def describe(self) -> dict:
        return {"name": self.name, "p_mean": self.p_mean, "p_std": self.p_std}


def _on_training_times(path: NoisePath, t: Tensor) -> Tensor:
    # Discrete schedules: the nearest training time k / T (k >= 1); continuous ones: t > 0 (sigma(0) = 0
    # makes the target undefined for x0-from-eps conversions).
    if path.discrete_T is not None:
        return path.snap(t.to(torch.float64)).to(t.dtype)
    return t.clamp(min=1e-5, max=1.0)
