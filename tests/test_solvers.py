"""Fast solvers, spacings, EDM, loss weightings, t sampling and zero terminal SNR against independent truth."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from helpers import float64  # noqa: F401  (the fixture used below)
from scipy import stats

from diffusion_lab import objectives as O
from diffusion_lab import samplers as S
from diffusion_lab import schedules as SC
from diffusion_lab import weighting as W

# Every test here compares against closed forms in float64 (the shared helpers.float64 fixture).
pytestmark = pytest.mark.usefixtures("float64")


PATHS = {
    "linear1000": lambda: SC.LinearSchedule(T=1000),
    "cosine1000": lambda: SC.CosineSchedule(T=1000),
    "linear50_scaled": lambda: SC.LinearSchedule(T=50, scale_with_T=True),
    "ztsnr1000": lambda: SC.LinearSchedule(T=1000, zero_terminal_snr=True),
    "linear_path": lambda: SC.LinearPath(),
    "ve": lambda: SC.VEPath(),
}
OBJECTIVES = {"eps": O.EpsPrediction, "x0": O.X0Prediction, "v": O.VPrediction, "velocity": O.VelocityPrediction,
              "edm": partial(O.EDMPreconditioned, sigma_data=0.5)}
NEW_SAMPLERS = {
    "dpmpp_2m": S.sample_dpmpp_2m,
    "dpmpp_3m": S.sample_dpmpp_3m,
    "edm": S.sample_edm,
    "edm_churn": partial(S.sample_edm, churn=10.0, s_tmin=0.05, s_tmax=50.0),
}
ALPHA_ZERO_AT_1 = {"linear_path", "ztsnr1000"}  # eps and EDM's c_noise are singular there


def valid(pname: str, oname: str, spacing: str) -> bool:
    if pname in ALPHA_ZERO_AT_1 and oname in ("eps", "edm"):
        return False  # refused by the objective (tested below)
    if pname in ("linear_path", "ve") and spacing == "leading":
        return False  # defined on training indices only (refused, tested below)
    # uniform / linspace in t is uniform in sigma on the VE path: EDM's reason for rho-spacing; a
    # 25-step grid with sigma steps of 3.2 down to 0 is not a sampler setting anyone should use.
    return not (pname == "ve" and spacing in ("uniform", "linspace"))


def karras_steps(path, spacing: str, steps: int) -> int:
    """Karras rho = 7 spends most steps near sigma_max; where sigma/alpha reaches 1e4 at t = 1 (cosine,
    zero terminal SNR, rectified flow) a 25-step grid leaves too few for the data end: test at 4x."""
    return 4 * steps if spacing == "karras" and path.ratio_range()[1] > 500 else steps


COMBOS = [(p, o, sp) for p in PATHS for o in OBJECTIVES for sp in SC.SPACINGS if valid(p, o, sp)]

# ---------------------------------------------------------------- Gaussian oracle
MU, TAU = 1.5, 0.5


def posterior(path, xt, t):
    """E[x0 | xt] and E[eps | xt] for data ~ N(MU, TAU^2) (closed form)."""
    alpha, sigma = (v[:, None] for v in path.alpha_sigma(t))
    x0_hat = MU + alpha * TAU**2 / (alpha**2 * TAU**2 + sigma**2) * (xt - alpha * MU)
    return x0_hat, (xt - alpha * x0_hat) / sigma


def oracle_net(path, objective):
    """Ideal net: E[target | xt]; for EDM first undo its input preconditioning (c_in xt, ln(sigma/alpha)/4)."""

    def net(x_in, t_in, cond=None):
        if isinstance(objective, O.EDMPreconditioned):
            assert torch.equal(t_in, t_in[:1].expand_as(t_in))  # samplers call with one time per batch
            t = path.t_of_ratio(torch.exp(4 * t_in[:1])).expand_as(t_in)
            alpha, sigma = path.alpha_sigma(t)
            xt = x_in * (sigma**2 + alpha**2 * objective.sigma_data**2).sqrt()[:, None]
        else:
            xt, t = x_in, t_in
        return objective.target(*posterior(path, xt, t), t)

    return net


@pytest.mark.parametrize("sname", list(NEW_SAMPLERS))
@pytest.mark.parametrize("pname,oname,spacing", COMBOS)
def test_gaussian_oracle_new_solvers(pname, oname, spacing, sname):
    """Closed-form denoiser through every valid path x objective x spacing x new solver recovers N(MU, TAU^2)."""
    path = PATHS[pname]()
    obj = OBJECTIVES[oname](path)
    steps = min(karras_steps(path, spacing, 25), path.discrete_T or 10**6)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(4000, 1, generator=g)
    x = NEW_SAMPLERS[sname](S.make_denoiser(oracle_net(path, obj), obj), path, noise, steps=steps,
                            spacing=spacing, generator=g)
    # Known, bounded errors: VP schedules start from N(0, I) although alpha(t_0) > 0 (leading starts
    # below t = 1), VE from N(0, sigma_max^2) without the data's mean; and O(1/steps) discretisation.
    alpha0 = float(path.alpha_sigma(path.grid(steps, spacing)[:1])[0])
    tol = 0.02 + 3.0 / steps + 2 * alpha0 * MU / path.prior_std
    assert abs(float(x.mean()) - MU) < tol, f"mean {float(x.mean()):.4f}"
    assert abs(float(x.std()) - TAU) < tol, f"std {float(x.std()):.4f}"


@pytest.mark.parametrize("sname,sampler", [("ancestral", S.sample_ancestral), ("ddim", S.sample_ddim),
                                           ("euler", S.sample_euler), ("heun", S.sample_heun)])
@pytest.mark.parametrize("pname,spacing", [(p, sp) for p in PATHS for sp in SC.SPACINGS
                                           if sp != "uniform" and valid(p, "x0", sp)])
def test_gaussian_oracle_existing_samplers_on_new_spacings(pname, spacing, sname, sampler):
    path = PATHS[pname]()
    obj = O.X0Prediction(path) if pname in ALPHA_ZERO_AT_1 else O.EpsPrediction(path)
    steps = min(karras_steps(path, spacing, 50), path.discrete_T or 10**6)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(4000, 1, generator=g)
    x = sampler(S.make_denoiser(oracle_net(path, obj), obj), path, noise, steps=steps, spacing=spacing, generator=g)
    alpha0 = float(path.alpha_sigma(path.grid(steps, spacing)[:1])[0])
    # ancestral ignores Var[x0 | xt]: O(1/steps), larger where the grid crowds the ends (Karras)
    tol = 0.02 + (8.0 if sname == "ancestral" else 3.0) / steps + 2 * alpha0 * MU / path.prior_std
    assert abs(float(x.mean()) - MU) < tol and abs(float(x.std()) - TAU) < tol, (float(x.mean()), float(x.std()))


def test_edm_sampler_on_ve_reaches_the_exact_ode_solution():
    """EDM's own setting (VE, Karras grid): the probability-flow map of N(MU, TAU^2) in closed form."""
    path = SC.VEPath()
    z = torch.linspace(-3, 3, 61)[:, None]
    x = S.sample_edm(lambda xt, t: posterior(path, xt, t), path, z, steps=80)
    exact = MU + TAU * (path.sigma_max * z - MU) / math.hypot(TAU, path.sigma_max)
    torch.testing.assert_close(x, exact, atol=5e-3, rtol=0)


# ---------------------------------------------------------------- independent re-derivations
def fixed_denoiser(path):
    """A fixed nonlinear 'net' (not a posterior): x0_hat = 0.7 tanh(xt) + 0.3 t."""

    def denoise(xt, t):
        alpha, sigma = (v[:, None] for v in path.alpha_sigma(t))
        x0_hat = 0.7 * torch.tanh(xt) + 0.3 * t[:, None]
        return x0_hat, (xt - alpha * x0_hat) / sigma

    return denoise


@pytest.mark.parametrize("spacing", ["uniform", "karras", "logsnr"])
def test_dpmpp_2m_equals_the_papers_algorithm(spacing):
    """Lu et al. 2022, Alg. 2 in numpy on alpha_bar from the beta table; the last step (to t = 0) first order."""
    T, steps = 1000, 15
    path = SC.LinearSchedule(T=T)
    k = (path.grid(steps, spacing) * T).round().long().numpy()
    alpha_bar = np.concatenate([[1.0], np.cumprod(1 - np.linspace(1e-4, 0.02, T))])[k]
    a, s = np.sqrt(alpha_bar), np.sqrt(1 - alpha_bar)
    lam = np.log(a[:-1]) - np.log(s[:-1])  # lambda_{t_i}, i < M (lambda_M = +inf)
    x = np.linspace(-2.5, 2.5, 11)[:, None]
    model = lambda x, i: 0.7 * np.tanh(x) + 0.3 * k[i] / T
    prev = None
    for i in range(steps):
        m = model(x, i)
        if i == steps - 1:
            x = m  # sigma = 0: x_{t_M} = x0_theta
            break
        h = lam[i + 1] - lam[i]
        if prev is None:
            D = m
        else:
            r = (lam[i] - lam[i - 1]) / h
            D = (1 + 1 / (2 * r)) * m - 1 / (2 * r) * prev
        x = s[i + 1] / s[i] * x - a[i + 1] * (np.exp(-h) - 1) * D
        prev = m
    ours = S.sample_dpmpp_2m(fixed_denoiser(path), path, torch.linspace(-2.5, 2.5, 11)[:, None], steps, spacing=spacing)
    np.testing.assert_allclose(ours.numpy(), x, rtol=1e-10, atol=1e-12)


def test_dpmpp_2m_first_step_is_ddim():
    path = SC.LinearSchedule(T=1000)
    noise = torch.linspace(-2, 2, 9)[:, None]
    seen = []
    S.sample_dpmpp_2m(fixed_denoiser(path), path, noise, 10, callback=lambda i, t, x: seen.append(x.clone()))
    ddim = []
    S.sample_ddim(fixed_denoiser(path), path, noise, 10, callback=lambda i, t, x: ddim.append(x.clone()))
    torch.testing.assert_close(seen[0], ddim[0], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(seen[1], ddim[1])


@pytest.mark.parametrize("order_sampler,expect", [(S.sample_dpmpp_2m, 4.0), (S.sample_dpmpp_3m, 8.0),
                                                  (S.sample_ddim, 2.0), (S.sample_heun, 4.0)])
def test_convergence_order_on_the_exact_ode(order_sampler, expect):
    """Error vs the closed-form PF-ODE solution falls 2^order per halved step (VE, Karras grid, 40 -> 80 -> 160)."""
    path = SC.VEPath()
    z = torch.linspace(-3, 3, 61)[:, None]
    exact = MU + TAU * (path.sigma_max * z - MU) / math.hypot(TAU, path.sigma_max)
    errs = [float((order_sampler(lambda xt, t: posterior(path, xt, t), path, z, n, spacing="karras") - exact)
                  .abs().max()) for n in (40, 80, 160)]
    ratio = math.sqrt(errs[0] / errs[2])  # mean rate over two halvings
    assert 0.75 * expect < ratio < 1.5 * expect, errs


@pytest.mark.parametrize("pname", ["linear1000", "cosine1000", "ztsnr1000", "linear_path", "ve"])
@pytest.mark.parametrize("spacing", ["uniform", "karras", "logsnr"])
def test_edm_sampler_without_churn_is_heun(pname, spacing):
    path = PATHS[pname]()
    noise = torch.linspace(-2, 2, 9)[:, None]
    a = S.sample_edm(fixed_denoiser(path), path, noise, 12, spacing=spacing)
    b = S.sample_heun(fixed_denoiser(path), path, noise, 12, spacing=spacing)
    assert torch.equal(a, b)


def test_edm_churn_equals_karras_algorithm_2():
    """Karras et al. 2022, Alg. 2 in sigma (VE: sigma = t), same noise draws, S_tmin/S_tmax gating."""
    path = SC.VEPath()
    steps, churn, s_tmin, s_tmax, s_noise = 12, 30.0, 0.05, 50.0, 1.003
    sig = (path.grid(steps, "karras") * path.sigma_max).tolist()
    D = lambda x, sigma: posterior(path, x, torch.full((x.shape[0],), sigma / path.sigma_max))[0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 1, generator=g) * path.sigma_max
    noise0 = x / path.sigma_max
    for i in range(steps):
        gamma = min(churn / steps, math.sqrt(2) - 1) if s_tmin <= sig[i] <= s_tmax else 0.0
        s_hat = sig[i] * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(s_hat**2 - sig[i] ** 2) * s_noise * torch.randn(x.shape, generator=g)
        d = (x - D(x, s_hat)) / s_hat
        x_next = x + (sig[i + 1] - s_hat) * d
        if sig[i + 1] != 0:
            x_next = x + (sig[i + 1] - s_hat) * (d + (x_next - D(x_next, sig[i + 1])) / sig[i + 1]) / 2
        x = x_next
    g = torch.Generator().manual_seed(3)
    torch.randn(500, 1, generator=g)  # the prior draw above
    ours = S.sample_edm(lambda xt, t: posterior(path, xt, t), path, noise0, steps, churn=churn, s_tmin=s_tmin,
                        s_tmax=s_tmax, s_noise=s_noise, generator=g)
    torch.testing.assert_close(ours, x, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampler", [S.sample_ancestral, S.sample_ddim, S.sample_euler, S.sample_heun,
                                     S.sample_dpmpp_2m, S.sample_dpmpp_3m, S.sample_edm,
                                     partial(S.sample_edm, churn=5.0)])
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_declared_nfe_counts_the_net_calls(sampler, steps):
    path = SC.LinearSchedule(T=100)
    calls = []

    def denoise(xt, t):
        calls.append(1)
        return fixed_denoiser(path)(xt, t)

    sampler(denoise, path, torch.zeros(3, 1), steps, generator=torch.Generator().manual_seed(0))
    assert len(calls) == S.nfe(sampler, steps)


# ---------------------------------------------------------------- spacings against closed forms
@pytest.mark.parametrize("T,steps", [(1000, 10), (1000, 50), (1000, 7), (500, 30), (50, 50)])
def test_discrete_spacings_equal_diffusers_formulas(T, steps):
    """diffusers' trailing / leading / linspace timesteps (its index i is our k = i + 1), then t = 0."""
    path = SC.LinearSchedule(T=T)
    k = lambda sp: (path.grid(steps, sp) * T).round().long().tolist()
    trailing = np.round(np.arange(T, 0, -T / steps)).astype(int) - 1
    leading = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(int)
    linspace = np.linspace(0, T - 1, steps).round()[::-1].astype(int)
    assert k("uniform") == [*(trailing + 1).tolist(), 0]
    assert k("leading") == [*(leading + 1).tolist(), 0]
    assert k("linspace") == [*(linspace + 1).tolist(), 0]


@pytest.mark.parametrize("steps", [5, 18, 40])
def test_karras_and_logsnr_on_ve_are_the_closed_forms(steps):
    """EDM eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, then 0; log-SNR: geometric."""
    path = SC.VEPath(0.002, 80.0)
    i = np.arange(steps)
    ramp = i / max(steps - 1, 1)
    karras = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose((path.grid(steps, "karras") * 80).numpy(), [*karras, 0], rtol=1e-12)
    geometric = 80 * (0.002 / 80) ** ramp
    np.testing.assert_allclose((path.grid(steps, "logsnr") * 80).numpy(), [*geometric, 0], rtol=1e-12)


@pytest.mark.parametrize("pname", ["linear1000", "cosine1000", "linear50_scaled", "ztsnr1000"])
@pytest.mark.parametrize("spacing", ["karras", "logsnr"])
@pytest.mark.parametrize("steps", [5, 20, 50])
def test_discrete_karras_logsnr_land_on_the_nearest_training_times(pname, spacing, steps):
    path = PATHS[pname]()
    T = path.discrete_T
    steps = min(steps, T)
    k = (path.grid(steps, spacing) * T).round().long()
    assert torch.equal(path.grid(steps, spacing), k.double() / T), "off the training grid"
    assert k[0] == T and k[-1] == 0 and (k[:-1] > k[1:]).all() and k[-2] >= 1
    # The closed-form ratios: snapped points are the nearest training k in log(sigma/alpha) unless two
    # targets collided (then pushed apart by one index).
    lo, hi = path.ratio_range()
    u = np.linspace(0, 1, steps)
    if spacing == "karras":
        target = (hi ** (1 / 7) + u * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    else:
        target = np.exp(np.log(hi) + u * (np.log(lo) - np.log(hi)))
    all_k = np.arange(1, T + 1)
    log_r = np.log(path.ratio(torch.tensor(all_k / T)).numpy())
    nearest = all_k[np.abs(log_r[None, :] - np.log(target)[:, None]).argmin(1)]
    if len({T, *nearest[1:].tolist()}) == steps:  # no collisions: exactly the nearest training times
        assert k[1:-1].tolist() == nearest[1:].tolist()
    else:  # collisions (dense targets near sigma_min or sigma_max) were pushed apart, keeping the order
        assert pname != "linear1000" or steps == 50, "the plain linear schedule has no collisions below 50 steps"


def test_spacing_errors_are_one_line():
    with pytest.raises(ValueError, match=r"^spacing='trailing': expected one of uniform, leading"):
        SC.LinearSchedule(T=100).grid(10, "trailing")
    with pytest.raises(ValueError, match=r"^spacing=leading: expected a discrete schedule"):
        SC.VEPath().grid(10, "leading")


# ---------------------------------------------------------------- loss weightings and t sampling
@pytest.mark.parametrize("pname", ["linear1000", "cosine1000", "linear_path"])
def test_min_snr_weights_equal_the_papers_per_target_formulas(pname):
    """Hang et al. 2023: eps: min(SNR,g)/SNR; x0: min(SNR,g); v: min(SNR,g)/(SNR+1); velocity from u's x0 factor."""
    path = PATHS[pname]()
    t = torch.tensor([50, 200, 500, 800, 950]) / 1000  # training times of the T = 1000 schedules
    alpha, sigma = path.alpha_sigma(t)
    snr = alpha**2 / sigma**2
    g = 5.0
    w = W.MinSNRWeighting(gamma=g)
    wanted = {"x0": snr.clamp(max=g), "v": snr.clamp(max=g) / (alpha**2 + sigma**2) ** 2 * sigma**2,
              "velocity": None}
    if pname != "linear_path":
        wanted["eps"] = snr.clamp(max=g) / snr
        assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(t))  # VP: v's factor is SNR + 1
        wanted["v_paper"] = snr.clamp(max=g) / (snr + 1)
    else:  # u = eps - x0: ||u_hat - u|| = ||x0_hat - x0|| / t
        wanted["velocity"] = snr.clamp(max=g) * t**2
    for oname, expect in wanted.items():
        if expect is None:
            continue
        obj = OBJECTIVES[oname.removesuffix("_paper")](path)
        torch.testing.assert_close(w(obj, t).double(), expect, rtol=1e-5, atol=1e-7)


def test_edm_weighting_is_the_preconditioned_objectives_own_loss():
    """lambda(sigma) = 1 / c_out^2: on the EDM objective the EDM weighting multiplies its MSE by exactly 1."""
    path = SC.VEPath()
    obj = O.EDMPreconditioned(path, sigma_data=0.5)
    t = torch.tensor([1e-4, 0.003, 0.02, 0.3, 1.0])
    torch.testing.assert_close(W.EDMWeighting(0.5)(obj, t).double(), torch.ones(5), rtol=1e-5, atol=0)
    # and on x0-prediction it is lambda itself (x0 factor 1)
    s = path.sigma_max * t
    torch.testing.assert_close(W.EDMWeighting(0.5)(O.X0Prediction(path), t).double(),
                               (s**2 + 0.25) / (s * 0.5) ** 2, rtol=1e-5, atol=0)


def test_weighted_loss_is_the_weight_times_the_plain_loss():
    path = SC.LinearSchedule(T=100)
    net = lambda x, t, c=None: 0.5 * x + t[:, None]
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    plain, t1 = O.EpsPrediction(path).loss(net, x0, generator=torch.Generator().manual_seed(1))
    weighted, t2 = O.EpsPrediction(path, weighting=W.MinSNRWeighting(2.0)).loss(
        net, x0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(t1, t2)
    alpha, sigma = path.alpha_sigma(t1)
    snr = alpha**2 / sigma**2
    torch.testing.assert_close(weighted, plain * (snr.clamp(max=2.0) / snr), rtol=1e-5, atol=1e-8)


def test_logit_normal_t_is_logit_normal():
    t = W.LogitNormalTime(m=0.3, s=0.8)(SC.LinearPath(), 20000, generator=torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t)).numpy()
    assert stats.kstest(logit, stats.norm(0.3, 0.8).cdf).pvalue > 1e-3


def test_lognormal_t_gives_edms_sigma_distribution_and_lands_on_training_times():
    t = W.LogNormalTime(-1.2, 1.2)(SC.VEPath(), 20000, generator=torch.Generator().manual_seed(0))
    log_sigma = torch.log(t * 80).numpy()
    assert stats.kstest(log_sigma[t.numpy() < 1], stats.norm(-1.2, 1.2).cdf).pvalue > 1e-3
    sched = SC.LinearSchedule(T=1000)
    t = W.LogNormalTime()(sched, 5000, generator=torch.Generator().manual_seed(0))
    k = t * 1000
    assert torch.allclose(k, k.round()) and k.min() >= 1 and k.max() <= 1000
    t = W.LogitNormalTime()(sched, 5000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(t * 1000, (t * 1000).round())


# ---------------------------------------------------------------- EDM objective and zero terminal SNR
@pytest.mark.parametrize("pname", ["linear1000", "cosine1000", "ve"])
def test_edm_objective_round_trip_and_affine(pname):
    path = PATHS[pname]()
    obj = O.EDMPreconditioned(path, sigma_data=0.7)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g)
    t = path.sample_t(64, generator=g).clamp(min=1e-3)
    alpha, sigma = path.alpha_sigma(t)
    xt = alpha[:, None] * x0 + sigma[:, None] * eps
    x0_hat, eps_hat = obj.to_x0_eps(obj.target(x0, eps, t), xt, t)
    torch.testing.assert_close(x0_hat, x0, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(eps_hat, eps, atol=1e-8, rtol=1e-6)
    # Karras et al. Table 1 on VE: c_in = 1 / sqrt(s^2 + sd^2), c_noise = ln(s) / 4
    x_in, c_noise = obj.net_inputs(xt, t)
    s = sigma / alpha
    torch.testing.assert_close(x_in, xt / (alpha * (s**2 + 0.49).sqrt())[:, None])
    torch.testing.assert_close(c_noise, s.log() / 4)
    a, b = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g)  # affine in the output
    mid = obj.to_x0_eps(0.3 * a + 0.7 * b, xt, t)[0]
    torch.testing.assert_close(mid, 0.3 * obj.to_x0_eps(a, xt, t)[0] + 0.7 * obj.to_x0_eps(b, xt, t)[0])


@pytest.mark.parametrize("make", [lambda z: SC.LinearSchedule(T=1000, zero_terminal_snr=z),
                                  lambda z: SC.CosineSchedule(T=1000, zero_terminal_snr=z),
                                  lambda z: SC.SigmoidSchedule(T=1000, zero_terminal_snr=z)])
def test_zero_terminal_snr(make):
    """Lin et al. 2024: alpha_bar_T == 0 exactly, sqrt(alpha_bar_1) unchanged; eps refused in one line."""
    plain, zero = make(False), make(True)
    assert float(zero.log_alpha_bar[-1].exp()) == 0.0
    alpha, sigma = zero.alpha_sigma(torch.tensor([1.0]))
    assert float(alpha) == 0.0 and float(sigma) == 1.0
    a1_plain = plain.alpha_sigma(torch.tensor([1 / 1000]))[0]
    a1_zero = zero.alpha_sigma(torch.tensor([1 / 1000]))[0]
    torch.testing.assert_close(a1_zero, a1_plain, rtol=1e-15, atol=0)
    # Lin et al.'s shift-and-scale of sqrt(alpha_bar), recomputed from the plain table
    sab = plain.log_alpha_bar[1:].mul(0.5).exp()
    expect = (sab - sab[-1]) * sab[0] / (sab[0] - sab[-1])
    torch.testing.assert_close(zero.log_alpha_bar[1:].mul(0.5).exp(), expect, rtol=1e-12, atol=1e-15)
    # the last segment is continuous and its derivative is the finite difference
    t = torch.tensor([0.9995])
    h = 1e-7
    da, ds = zero.alpha_sigma_dt(t)
    a_p, s_p = zero.alpha_sigma(t + h)
    a_m, s_m = zero.alpha_sigma(t - h)
    torch.testing.assert_close(da, (a_p - a_m) / (2 * h), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(ds, (s_p - s_m) / (2 * h), rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match=r"^eps-prediction: .*zero-terminal-SNR") as info:
        O.EpsPrediction(zero)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"^objective=edm: "):
        O.EDMPreconditioned(zero)


@pytest.mark.parametrize("steps", [8, 25])
def test_dpmpp_2m_equals_diffusers_dpm_solver_multistep(steps):
    """The reference implementation: diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, trailing grid,
    final sigma 0) on the same eps-net and noise (bench extra only; its tables are float32)."""
    diffusers = pytest.importorskip("diffusers")
    T = 1000
    path = SC.LinearSchedule(T=T)
    eps_net = lambda x, k: torch.sin(1.3 * x) * 0.8 + 0.001 * k  # a fixed smooth net of (x, training index k)
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule="linear",
                                                  algorithm_type="dpmsolver++", solver_order=2,
                                                  timestep_spacing="trailing", final_sigmas_type="zero")
    sched.set_timesteps(steps)
    noise = torch.linspace(-3, 3, 41, dtype=torch.float32)[:, None]
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(eps_net(x, int(t) + 1), t, x).prev_sample  # diffusers' index t is our k = t + 1
    obj = O.EpsPrediction(path)
    ours = S.sample_dpmpp_2m(S.make_denoiser(lambda xt, t, c: eps_net(xt, torch.round(t * T)[:, None]), obj), path,
                             noise.double(), steps, spacing="uniform")
    # equal up to diffusers' float32 arithmetic: |x| reaches ~1e3 here (x0 = (x - sigma eps) / alpha near t = 1)
    assert float((ours.float() - x).abs().max()) <= 1e-5 * float(x.abs().max())
