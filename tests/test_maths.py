"""Core maths against independent truth: round trips, closed-form Gaussian oracle, textbook updates."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from helpers import float64  # noqa: F401  (the fixture used below)

from diffusion_lab import objectives as O
from diffusion_lab import samplers as S
from diffusion_lab import schedules as SC

# Every test here compares against closed forms in float64 (the shared helpers.float64 fixture).
pytestmark = pytest.mark.usefixtures("float64")


DISCRETE = {
    "linear1000": lambda: SC.LinearSchedule(T=1000),
    "linear500": lambda: SC.LinearSchedule(T=500),
    "linear50_scaled": lambda: SC.LinearSchedule(T=50, scale_with_T=True),
    "cosine1000": lambda: SC.CosineSchedule(T=1000),
    "sigmoid1000": lambda: SC.SigmoidSchedule(T=1000, beta_end=0.03),
}
PATHS = {**DISCRETE, "linear_path": lambda: SC.LinearPath()}
OBJECTIVES = {"eps": O.EpsPrediction, "x0": O.X0Prediction, "v": O.VPrediction, "velocity": O.VelocityPrediction}


def valid_pairs():
    for pname in PATHS:
        for oname in OBJECTIVES:
            if pname == "linear_path" and oname == "eps":
                continue  # singular at t=1 (alpha=0): refused by EpsPrediction, tested below
            yield pname, oname


@pytest.mark.parametrize("pname,oname", list(valid_pairs()))
def test_round_trip(pname, oname):
    """to_x0_eps(target(x0, eps, t), xt, t) == (x0, eps) for every objective on every path."""
    path = PATHS[pname]()
    obj = OBJECTIVES[oname](path)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g)
    t = path.sample_t(64, generator=g).clamp(min=1e-3)
    alpha, sigma = path.alpha_sigma(t)
    xt = alpha[:, None] * x0 + sigma[:, None] * eps
    x0_hat, eps_hat = obj.to_x0_eps(obj.target(x0, eps, t), xt, t)
    torch.testing.assert_close(x0_hat, x0, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(eps_hat, eps, atol=1e-8, rtol=1e-6)


def test_eps_on_linear_path_is_refused():
    with pytest.raises(ValueError, match="eps-prediction"):
        O.EpsPrediction(SC.LinearPath())


@pytest.mark.parametrize("name", list(DISCRETE))
def test_discrete_schedule_matches_beta_table_on_grid(name):
    """alpha(k/T)^2 == prod_{i<=k}(1 - beta_i) at every grid point (classic DDPM)."""
    sched = DISCRETE[name]()
    k = torch.arange(sched.discrete_T + 1)
    alpha, sigma = sched.alpha_sigma(k / sched.discrete_T)
    alpha_bar = torch.cat([torch.ones(1), torch.cumprod(1 - sched.betas, 0)])
    torch.testing.assert_close(alpha**2, alpha_bar, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sigma**2, 1 - alpha_bar, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(PATHS))
def test_derivatives_match_finite_differences(name):
    path = PATHS[name]()
    t = torch.tensor([0.1234, 0.5077, 0.9011])  # off-grid points: derivative is the segment slope
    h = 1e-7
    a1, s1 = path.alpha_sigma(t + h)
    a0, s0 = path.alpha_sigma(t - h)
    da, ds = path.alpha_sigma_dt(t)
    torch.testing.assert_close(da, (a1 - a0) / (2 * h), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ds, (s1 - s0) / (2 * h), rtol=1e-4, atol=1e-6)


def test_linear_betas_textbook_values():
    sched = SC.LinearSchedule(T=500)
    torch.testing.assert_close(sched.betas, torch.linspace(1e-4, 0.02, 500, dtype=torch.float64))
    cos = SC.CosineSchedule(T=1000)
    # Nichol & Dhariwal: alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) * pi/2)
    f = lambda k: math.cos((k / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    assert float(cos.alpha_sigma(torch.tensor([0.5]))[0] ** 2) == pytest.approx(f(500) / f(0), rel=1e-9)


def test_grid_respacing():
    sched = SC.LinearSchedule(T=1000)
    g = sched.grid(1000)
    torch.testing.assert_close(g, torch.arange(1000, -1, -1) / 1000)
    g300 = sched.grid(300) * 1000
    assert g300[0] == 1000 and g300[-1] == 0 and len(g300) == 301
    assert torch.allclose(g300, g300.round()) and (g300[:-1] > g300[1:]).all()
    with pytest.raises(ValueError, match="steps=1001"):
        sched.grid(1001)
    with pytest.raises(ValueError, match="steps=0"):
        SC.LinearPath().grid(0)


# ---------------------------------------------------------------- Gaussian oracle
MU, TAU = 1.5, 0.5


def oracle_net(path, objective):
    """Ideal net for data ~ N(MU, TAU^2): E[target | xt] = target(E[x0|xt], E[eps|xt]) (target is affine)."""

    def net(xt, t, cond=None):
        alpha, sigma = (v[:, None] for v in path.alpha_sigma(t))
        x0_hat = MU + alpha * TAU**2 / (alpha**2 * TAU**2 + sigma**2) * (xt - alpha * MU)
        eps_hat = (xt - alpha * x0_hat) / sigma
        return objective.target(x0_hat, eps_hat, t)

    return net


SAMPLER_SETTINGS = {
    "ancestral_all": (S.sample_ancestral, None),
    "ancestral_40": (S.sample_ancestral, 40),
    "ancestral_large_var": (partial(S.sample_ancestral, variance="large"), None),
    "ddim0_50": (S.sample_ddim, 50),
    "ddim05_50": (partial(S.sample_ddim, eta=0.5), 50),
    "euler_50": (S.sample_euler, 50),
    "heun_50": (S.sample_heun, 50),
}


@pytest.mark.parametrize("sname", list(SAMPLER_SETTINGS))
@pytest.mark.parametrize("pname,oname", list(valid_pairs()))
def test_gaussian_oracle_recovers_data(pname, oname, sname):
    """Closed-form denoiser through every schedule x objective x sampler recovers N(MU, TAU^2)."""
    path = PATHS[pname]()
    obj = OBJECTIVES[oname](path)
    sampler, steps = SAMPLER_SETTINGS[sname]
    if steps is None:
        steps = path.discrete_T or 500
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(20000, 1, generator=g)
    x = sampler(S.make_denoiser(oracle_net(path, obj), obj), path, noise, steps=steps, generator=g)
    # Known, bounded errors: the discrete schedules start from N(0, I) although alpha(1) > 0, and
    # the first-order solvers (and ancestral's ignored Var[x0|xt]) err by O(1/steps).
    alpha1 = float(path.alpha_sigma(torch.ones(1))[0])
    tol = 0.02 + 3.0 / steps + 2 * alpha1 * MU
    assert abs(float(x.mean()) - MU) < tol, f"mean {float(x.mean()):.4f}"
    assert abs(float(x.std()) - TAU) < tol, f"std {float(x.std()):.4f}"


# ---------------------------------------------------------------- textbook equivalences
def test_all_steps_ancestral_equals_ho_et_al_update():
    """steps == T ancestral == x_{t-1} = (x_t - beta_t/sqrt(1-abar_t) eps)/sqrt(alpha_t) + sqrt(beta_tilde_t) z."""
    T = 50
    sched = SC.LinearSchedule(T=T, scale_with_T=True)
    betas = sched.betas
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    torch.manual_seed(0)
    w = torch.randn(2, 2)
    eps_net = lambda x, t, cond=None: torch.tanh(x @ w) * (1 + t[:, None])  # arbitrary smooth eps model
    obj = O.EpsPrediction(sched)
    noise = torch.randn(16, 2)

    ours = S.sample_ancestral(S.make_denoiser(eps_net, obj), sched, noise, steps=T,
                              generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    x = noise
    for k in range(T, 0, -1):  # textbook loop, 1-based k as in Ho et al. Algorithm 2
        i = k - 1
        eps = eps_net(x, torch.full((16,), k / T))
        mean = (x - betas[i] / torch.sqrt(1 - abar[i]) * eps) / torch.sqrt(alphas[i])
        if k > 1:
            beta_tilde = (1 - abar[i - 1]) / (1 - abar[i]) * betas[i]
            x = mean + torch.sqrt(beta_tilde) * torch.randn(x.shape, generator=g)
        else:
            x = mean
    torch.testing.assert_close(ours, x, rtol=1e-9, atol=1e-10)


def test_ddim_textbook_update():
    """DDIM eta=0 (Song et al. eq. 12) from x0 = (x_t - sqrt(1-abar_t) eps)/sqrt(abar_t)."""
    sched = SC.LinearSchedule(T=100)
    obj = O.EpsPrediction(sched)
    eps_net = lambda x, t, cond=None: torch.sin(x) * t[:, None]
    noise = torch.randn(8, 2)
    ours = S.sample_ddim(S.make_denoiser(eps_net, obj), sched, noise, steps=10)
    abar = torch.cat([torch.ones(1), torch.cumprod(1 - sched.betas, 0)])
    x = noise
    for k, k_prev in zip(range(100, 0, -10), range(90, -1, -10)):
        eps = eps_net(x, torch.full((8,), k / 100))
        x0 = (x - (1 - abar[k]).sqrt() * eps) / abar[k].sqrt()
        x = abar[k_prev].sqrt() * x0 + (1 - abar[k_prev]).sqrt() * eps
    torch.testing.assert_close(ours, x)


def test_ddim_on_linear_path_equals_euler():
    path = SC.LinearPath()
    obj = O.VelocityPrediction(path)
    net = lambda x, t, cond=None: torch.cos(x) - 0.3 * x * t[:, None]
    noise = torch.randn(32, 2)
    den = S.make_denoiser(net, obj)
    torch.testing.assert_close(S.sample_ddim(den, path, noise, 17), S.sample_euler(den, path, noise, 17))


def test_ddim_eta1_equals_ancestral():
    sched = SC.CosineSchedule(T=200)
    obj = O.VPrediction(sched)
    net = lambda x, t, cond=None: torch.tanh(x) * t[:, None]
    noise = torch.randn(32, 2)
    den = S.make_denoiser(net, obj)
    a = S.sample_ancestral(den, sched, noise, 40, generator=torch.Generator().manual_seed(3))
    b = S.sample_ddim(den, sched, noise, 40, eta=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sampler", [S.sample_ancestral, partial(S.sample_ddim, eta=0.7)])
def test_same_seed_same_samples(sampler):
    sched = SC.LinearSchedule(T=100)
    obj = O.EpsPrediction(sched)
    den = S.make_denoiser(lambda x, t, c=None: 0.5 * x, obj)
    noise = torch.randn(16, 2)
    runs = [sampler(den, sched, noise, 50, generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_sampler_argument_errors():
    sched = SC.LinearSchedule(T=10)
    den = S.make_denoiser(lambda x, t, c=None: x, O.EpsPrediction(sched))
    with pytest.raises(ValueError, match="eta=1.5"):
        S.sample_ddim(den, sched, torch.zeros(1, 1), 5, eta=1.5)
    with pytest.raises(ValueError, match="steps=11"):
        S.sample_euler(den, sched, torch.zeros(1, 1), 11)
    with pytest.raises(ValueError, match="T=-3"):
        SC.LinearSchedule(T=-3)


@pytest.mark.parametrize("oname", list(OBJECTIVES))
def test_cfg_scale_one_is_conditional_and_zero_unconditional(oname):
    sched = SC.LinearSchedule(T=100)
    obj = OBJECTIVES[oname](sched)
    net = lambda x, t, c: x * (1.0 + (c[:, None] >= 0) * (c[:, None] + 1.0)) * t[:, None]
    xt, t, cond = torch.randn(6, 2), torch.rand(6) * 0.9 + 0.05, torch.tensor([0, 1, 2, 0, 1, 2])
    cond_only = obj.to_x0_eps(net(xt, t, cond), xt, t)
    uncond = obj.to_x0_eps(net(xt, t, torch.full_like(cond, -1)), xt, t)
    for scale, want in ((1.0, cond_only), (0.0, uncond)):
        got = S.make_denoiser(S.guided_net(net, scale), obj, cond)(xt, t)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])


def test_classifier_guidance_moves_samples_to_the_requested_class():
    """Two-class 1D mixture, closed-form denoiser and Bayes classifier on xt: guided samples land in class y."""
    path = SC.LinearSchedule(T=200, scale_with_T=True)
    obj = O.EpsPrediction(path)
    mus, tau = torch.tensor([-2.0, 2.0]), 0.4

    def component_logits(xt, t):  # log N(xt; alpha mu_k, alpha^2 tau^2 + sigma^2) per component k
        alpha, sigma = (v[:, None] for v in path.alpha_sigma(t))
        var = alpha**2 * tau**2 + sigma**2
        return -0.5 * (xt - alpha * mus) ** 2 / var - 0.5 * torch.log(var)

    def net(xt, t, cond=None):  # ideal eps for the equal-weight mixture: posterior-weighted per component
        alpha, sigma = (v[:, None] for v in path.alpha_sigma(t))
        w = torch.softmax(component_logits(xt, t), dim=1)
        x0_k = mus + alpha * tau**2 / (alpha**2 * tau**2 + sigma**2) * (xt - alpha * mus)
        x0_hat = (w * x0_k).sum(1, keepdim=True)
        return (xt - alpha * x0_hat) / sigma

    classifier = lambda xt, t: component_logits(xt, t)  # Bayes classifier p(y | xt), any xt shape (B, 1)
    noise = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0))
    for y in (0, 1):
        cond = torch.full((4000,), y)
        den = S.classifier_guided(S.make_denoiser(net, obj), classifier, cond, scale=1.0, path=path, chunk=1000)
        x = S.sample_ddim(den, path, noise, steps=100)
        in_class = ((x.squeeze(1) > 0) == bool(y)).float().mean()
        assert in_class > 0.99, (y, float(in_class))
        assert abs(float(x.mean()) - float(mus[y])) < 0.1 and abs(float(x.std()) - tau) < 0.1
    unguided = S.sample_ddim(S.make_denoiser(net, obj), path, noise, steps=100)
    assert 0.4 < float((unguided > 0).float().mean()) < 0.6  # without guidance: both classes
