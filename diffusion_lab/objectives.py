"""What the net predicts: targets, conversions back to (x0, eps), and the one training loss.

Every conversion `to_x0_eps(out, xt, t)` is affine in `out` and satisfies
`xt == alpha * x0_hat + sigma * eps_hat` exactly, so one guidance wrapper and one sampler loop
serve every objective.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from diffusion_lab.schedules import NoisePath, broadcast_to

NULL_CLASS = -1  # label meaning "no condition" (the unconditional branch of CFG)


def drop_labels(cond: Tensor | None, p_uncond: float, generator: torch.Generator | None = None):
    """Classifier-free guidance training (Ho & Salimans 2022): replace labels by NULL_CLASS w.p. p_uncond."""
    if cond is None or p_uncond <= 0:
        return cond
    drop = torch.rand(cond.shape, generator=generator, device=cond.device) < p_uncond
    return torch.where(drop, torch.full_like(cond, NULL_CLASS), cond)


class Objective(ABC):
    """A parametrization of the denoiser output on a given noise path."""

    name = "objective"

    def __init__(self, schedule: NoisePath, p_uncond: float = 0.0):
        if not 0 <= p_uncond <= 1:
            raise ValueError(f"p_uncond={p_uncond}: expected a probability in [0, 1]")
        self.schedule = schedule
        self.p_uncond = p_uncond

    def _coeffs(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        alpha, sigma = self.schedule.alpha_sigma(t)
        return broadcast_to(alpha.to(x.dtype), x), broadcast_to(sigma.to(x.dtype), x)

    @abstractmethod
    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Regression target for the net given clean data, noise and time."""

    @abstractmethod
    def to_x0_eps(self, out: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Invert the parametrization: net output -> (x0_hat, eps_hat)."""

    def loss(self, net, x0: Tensor, cond: Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Simple denoising loss E||net(xt, t) - target||^2 (Ho et al. 2020); returns per-sample loss and t."""
        t = self.schedule.sample_t(x0.shape[0], generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        alpha, sigma = self._coeffs(t, x0)
        xt = alpha * x0 + sigma * eps
        out = net(xt, t, drop_labels(cond, self.p_uncond, generator))
        out = out.to(torch.promote_types(out.dtype, torch.float32))  # loss in >= fp32 under autocast
        err = (out - self.target(x0, eps, t)) ** 2
        return err.flatten(1).mean(1), t

    def describe(self) -> dict:
        return {"name": self.name, "p_uncond": self.p_uncond}


class EpsPrediction(Objective):
    """eps-prediction (Ho et al. 2020): out = eps."""

    name = "eps"

    def __init__(self, schedule: NoisePath, p_uncond: float = 0.0):
        super().__init__(schedule, p_uncond)
        alpha_end, _ = schedule.alpha_sigma(torch.ones(1, dtype=torch.float64))
        if float(alpha_end) <= 0:
            raise ValueError("eps-prediction: x0 = (xt - sigma*eps)/alpha is singular where alpha(t)=0 "
                             "(t=1 on the linear path); use objective=velocity, x0 or v")

    def target(self, x0, eps, t):
        return eps

    def to_x0_eps(self, out, xt, t):
        alpha, sigma = self._coeffs(t, xt)
        return (xt - sigma * out) / alpha, out


class X0Prediction(Objective):
    """x0-prediction: out = x0."""

    name = "x0"

    def target(self, x0, eps, t):
        return x0

    def to_x0_eps(self, out, xt, t):
        alpha, sigma = self._coeffs(t, xt)
        return out, (xt - alpha * out) / sigma


class VPrediction(Objective):
    """v-prediction (Salimans & Ho 2022): v = alpha*eps - sigma*x0; inverse valid on any path."""

    name = "v"

    def target(self, x0, eps, t):
        alpha, sigma = self._coeffs(t, x0)
        return alpha * eps - sigma * x0

    def to_x0_eps(self, out, xt, t):
        alpha, sigma = self._coeffs(t, xt)
        norm = alpha**2 + sigma**2  # = 1 on variance-preserving paths
        return (alpha * xt - sigma * out) / norm, (sigma * xt + alpha * out) / norm


class VelocityPrediction(Objective):
    """Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2022): u = alpha'(t) x0 + sigma'(t) eps.

    On the linear path u = eps - x0.
    """

    name = "velocity"

    def _dcoeffs(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        d_alpha, d_sigma = self.schedule.alpha_sigma_dt(t)
        return broadcast_to(d_alpha.to(x.dtype), x), broadcast_to(d_sigma.to(x.dtype), x)

    def target(self, x0, eps, t):
        d_alpha, d_sigma = self._dcoeffs(t, x0)
        return d_alpha * x0 + d_sigma * eps

    def to_x0_eps(self, out, xt, t):
        # Solve [[alpha, sigma], [alpha', sigma']] @ [x0, eps] = [xt, u].
        alpha, sigma = self._coeffs(t, xt)
        d_alpha, d_sigma = self._dcoeffs(t, xt)
        det = alpha * d_sigma - sigma * d_alpha
        return (d_sigma * xt - sigma * out) / det, (alpha * out - d_alpha * xt) / det


class FixedSigmaDenoising:
    """CS180 part 1 (not diffusion): a one-step denoiser D(x0 + sigma*eps) -> x0 at one fixed sigma.

    Same `loss` contract as the diffusion objectives so the same DiffusionModule trains it; `schedule`
    is accepted for the uniform build signature and not used.
    """

    name = "fixed_sigma"

    def __init__(self, schedule=None, sigma: float = 0.5):
        if sigma <= 0:
            raise ValueError(f"sigma={sigma}: expected > 0")
        self.schedule, self.sigma = schedule, sigma

    def denoise(self, net, z: Tensor, sigma: float | None = None) -> Tensor:
        """D(z): the net applied to a noisy image (its t input carries sigma, ignored when unconditioned)."""
        t = torch.full((z.shape[0],), float(self.sigma if sigma is None else sigma), device=z.device)
        return net(z, t, None)

    def loss(self, net, x0: Tensor, cond: Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """L2 between D(x0 + sigma eps) and x0; returns per-sample loss and t (= sigma)."""
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        out = self.denoise(net, x0 + self.sigma * eps)
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        per_sample = ((out - x0) ** 2).flatten(1).mean(1)
        return per_sample, torch.full_like(per_sample, min(self.sigma, 1.0))

    def describe(self) -> dict:
        return {"name": self.name, "sigma": self.sigma}
