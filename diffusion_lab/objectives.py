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
from diffusion_lab.weighting import UniformTime, UniformWeighting

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

    def __init__(self, schedule: NoisePath, p_uncond: float = 0.0, weighting=None, t_sampling=None):
        if not 0 <= p_uncond <= 1:
            raise ValueError(f"p_uncond={p_uncond}: expected a probability in [0, 1]")
        self.schedule = schedule
        self.p_uncond = p_uncond
        # Training-time choices (weighting.py); None keeps the plain loss on the path's own t draws.
        self.weighting = weighting if weighting is not None else UniformWeighting()
        self.t_sampling = t_sampling if t_sampling is not None else UniformTime()

    def _coeffs(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        alpha, sigma = self.schedule.alpha_sigma(t)
        return broadcast_to(alpha.to(x.dtype), x), broadcast_to(sigma.to(x.dtype), x)

    @abstractmethod
    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Regression target for the net given clean data, noise and time."""

    @abstractmethod
    def to_x0_eps(self, out: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Invert the parametrization: net output -> (x0_hat, eps_hat)."""

    def net_inputs(self, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """What the net is called with: (xt, t) unless the objective preconditions its input (EDM)."""
        return xt, t

    def x0_error_factor(self, t: Tensor) -> Tensor:
        """w(t) with ||out - target||^2 = w(t) ||x0_hat - x0||^2: 1 / (d x0_hat / d out)^2 (float64).

        Read off to_x0_eps itself (affine in out), so every objective gets it without its own formula.
        """
        t64 = t.to(torch.float64)
        one = torch.ones(t64.shape[0], 1, dtype=torch.float64, device=t.device)
        slope = self.to_x0_eps(one, 0 * one, t64)[0] - self.to_x0_eps(0 * one, 0 * one, t64)[0]
        return slope[:, 0] ** -2

    def loss(self, net, x0: Tensor, cond: Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Denoising loss E[w(t) ||net(xt, t) - target||^2] (Ho et al. 2020 with w = 1); per-sample loss and t."""
        t = self.t_sampling(self.schedule, x0.shape[0], generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        alpha, sigma = self._coeffs(t, x0)
        xt = alpha * x0 + sigma * eps
        out = net(*self.net_inputs(xt, t), drop_labels(cond, self.p_uncond, generator))
        out = out.to(torch.promote_types(out.dtype, torch.float32))  # loss in >= fp32 under autocast
        err = ((out - self.target(x0, eps, t)) ** 2).flatten(1).mean(1)
        weight = self.weighting(self, t)
        return (err if weight is None else err * weight.to(err.device)), t

    def describe(self) -> dict:
        out = {"name": self.name, "p_uncond": self.p_uncond}
        if not isinstance(self.weighting, UniformWeighting) or not isinstance(self.t_sampling, UniformTime):
            out |= {"weighting": self.weighting.describe(), "t_sampling": self.t_sampling.describe()}
        return out


class EpsPrediction(Objective):
    """eps-prediction (Ho et al. 2020): out = eps."""

    name = "eps"

    def __init__(self, schedule: NoisePath, p_uncond: float = 0.0, weighting=None, t_sampling=None):
        super().__init__(schedule, p_uncond, weighting, t_sampling)
        alpha_end, _ = schedule.alpha_sigma(torch.ones(1, dtype=torch.float64))
        if float(alpha_end) <= 0:
            raise ValueError("eps-prediction: x0 = (xt - sigma*eps)/alpha is singular where alpha(t)=0 "
                             "(t=1 on the linear path and on zero-terminal-SNR schedules); "
                             "use objective=velocity, x0 or v")

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


class EDMPreconditioned(Objective):
    """EDM preconditioning (Karras et al. 2022, Table 1) on any path, in the scaled variable xt / alpha.

    With s = sigma / alpha: D = c_skip(s) xt / alpha + c_out(s) F(c_in xt, c_noise), c_skip = sd^2 / (s^2 + sd^2),
    c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / (alpha sqrt(s^2 + sd^2)), c_noise = ln(s) / 4. The plain MSE
    on F is EDM's weighted loss lambda(s) ||D - x0||^2, lambda = 1 / c_out^2; to_x0_eps is affine in F.
    """

    name = "edm"

    def __init__(self, schedule: NoisePath, sigma_data: float = 0.5, p_uncond: float = 0.0,
                 weighting=None, t_sampling=None):
        super().__init__(schedule, p_uncond, weighting, t_sampling)
        if not sigma_data > 0:
            raise ValueError(f"sigma_data={sigma_data}: expected > 0")
        alpha_end, _ = schedule.alpha_sigma(torch.ones(1, dtype=torch.float64))
        if float(alpha_end) <= 0:
            raise ValueError("objective=edm: c_noise = ln(sigma/alpha)/4 is infinite where alpha(t)=0 "
                             "(rectified flow, zero terminal SNR); use a path with alpha(1) > 0")
        self.sigma_data = float(sigma_data)

    def _precond(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        alpha, sigma = self._coeffs(t, x)
        s, sd2 = sigma / alpha, self.sigma_data**2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / (s**2 + sd2).sqrt()
        return alpha, sigma, c_skip, c_out

    def net_inputs(self, xt, t):
        alpha, sigma = self._coeffs(t, xt)
        c_in = 1 / (sigma**2 + alpha**2 * self.sigma_data**2).sqrt()  # = 1 / (alpha sqrt(s^2 + sd^2))
        c_noise = (sigma / alpha).log().flatten(1)[:, 0] / 4
        return c_in * xt, c_noise.to(t.dtype)

    def target(self, x0, eps, t):
        alpha, sigma, c_skip, c_out = self._precond(t, x0)
        return (x0 - c_skip * (x0 + sigma / alpha * eps)) / c_out

    def to_x0_eps(self, out, xt, t):
        alpha, sigma, c_skip, c_out = self._precond(t, xt)
        x0 = c_skip * xt / alpha + c_out * out
        return x0, (xt - alpha * x0) / sigma

    def describe(self) -> dict:
        return {**super().describe(), "sigma_data": self.sigma_data}


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
