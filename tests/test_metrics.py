"""Tests for diffusion_lab.metrics and diffusion_lab.plots against independent ground truth."""

from __future__ import annotations

import math

import matplotlib.image as mpimg
import numpy as np
import pytest
import scipy.stats as ss
import torch
from matplotlib.figure import Figure

from diffusion_lab import metrics, plots


def _kde_gaussian_cross_entropy(n_ref: int, d: int) -> float:
    # Scott's rule: h = n^(-1/(d+4)); the KDE of N(0, I) data is ~ N(0, (1 + h^2) I) = N(0, s^2 I).
    # Cross-entropy of N(0, I) under N(0, s^2 I): d/2 * log(2*pi*s^2) + d / (2 s^2).
    s2 = 1.0 + n_ref ** (-2.0 / (d + 4))
    return 0.5 * d * math.log(2 * math.pi * s2) + 0.5 * d / s2


# ----------------------------------------------------------------------------- kde_nll


@pytest.mark.parametrize("d", [1, 2])
def test_kde_nll_matches_gaussian_closed_form(d):
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(5000, d))
    # 10k eval points keep this ~1.5 s; Monte-Carlo std of the estimate is ~0.007 (seeded, deterministic).
    samples = torch.from_numpy(rng.normal(size=(10000, d)))  # torch input path
    expected = _kde_gaussian_cross_entropy(5000, d)
    # Sanity: the smoothing bias is small relative to the entropy 1 + log(2*pi) in 2D.
    if d == 2:
        assert abs(expected - (1 + math.log(2 * math.pi))) < 0.01
    assert metrics.kde_nll(samples, reference) == pytest.approx(expected, abs=0.02)


def test_kde_nll_1d_vector_input_equals_column_input():
    rng = np.random.default_rng(1)
    ref, s = rng.normal(size=500), rng.normal(size=300)
    assert metrics.kde_nll(s, ref) == pytest.approx(metrics.kde_nll(s[:, None], ref[:, None]), rel=1e-12)


def test_kde_nll_far_samples_are_finite():
    # logpdf (log-sum-exp) instead of log(pdf): far-away samples give large finite NLL, not inf.
    rng = np.random.default_rng(2)
    value = metrics.kde_nll(np.full((4, 2), 100.0), rng.normal(size=(200, 2)))
    assert np.isfinite(value) and value > 1000


def test_kde_nll_rejects_non_finite():
    rng = np.random.default_rng(3)
    samples = rng.normal(size=(10, 2))
    samples[2, 0] = np.nan
    samples[5, 1] = np.inf
    with pytest.raises(ValueError, match="2 non-finite"):
        metrics.kde_nll(samples, rng.normal(size=(100, 2)))


# ----------------------------------------------------------------------------- energy distance


def test_energy_distance_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(700, 2))
    assert metrics.energy_distance(x, x.copy()) == pytest.approx(0.0, abs=1e-10)


def test_energy_distance_matches_scipy_1d():
    # scipy defines D = (2E|X-Y| - E|X-X'| - E|Y-Y'|)^(1/2) over the empirical measures,
    # i.e. our squared V-statistic equals scipy's value squared (unequal sizes on purpose).
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=1500), rng.normal(0.3, 1.5, size=1100)
    assert metrics.energy_distance(x, y) == pytest.approx(ss.energy_distance(x, y) ** 2, abs=1e-6)


def test_energy_distance_gaussian_shift_closed_form():
    # X ~ N(0,1), Y ~ N(m,1): X - Y ~ N(-m, 2), X - X' ~ N(0, 2), and for W ~ N(mu, s^2)
    # E|W| = s*sqrt(2/pi)*exp(-mu^2 / (2 s^2)) + mu*(1 - 2*Phi(-mu/s)).
    m, s = 1.0, math.sqrt(2.0)
    e_xy = s * math.sqrt(2 / math.pi) * math.exp(-(m**2) / (2 * s**2)) + m * (1 - 2 * ss.norm.cdf(-m / s))
    e_xx = s * math.sqrt(2 / math.pi)
    expected = 2 * e_xy - 2 * e_xx
    # Stratified (quantile-grid) samples instead of random draws: with random samples the
    # estimate is dominated by sample-mean noise (+-10% at n=4000), which would hide real bugs.
    n = 4000
    x = ss.norm.ppf((np.arange(n) + 0.5) / n)
    y = x + m
    assert metrics.energy_distance(x, y) == pytest.approx(expected, rel=2e-3)


def test_energy_distance_2d_symmetric_and_positive():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(1200, 2)), rng.normal(size=(1300, 2)) + np.array([0.5, 0.0])
    dxy, dyx = metrics.energy_distance(x, y), metrics.energy_distance(torch.from_numpy(y), x)
    assert dxy == pytest.approx(dyx, rel=1e-10) and dxy > 0.05


# ----------------------------------------------------------------------------- sliced W1


@pytest.mark.parametrize("n, m", [(800, 800), (800, 531)])
def test_sliced_wasserstein_1d_is_exact_w1(n, m):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=n), rng.gamma(2.0, size=m)
    assert metrics.sliced_wasserstein(x, y) == pytest.approx(ss.wasserstein_distance(x, y), abs=1e-12)


def test_sliced_wasserstein_unequal_sizes_matches_scipy_per_projection():
    # In 2D with unequal n the quantile-interpolation path must equal scipy on every projection.
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 2)), rng.normal(size=(170, 2)) * 1.5
    theta = np.array([[0.6], [0.8]])
    expected = ss.wasserstein_distance((x @ theta)[:, 0], (y @ theta)[:, 0])
    got = metrics._w1_1d(torch.from_numpy(x @ theta), torch.from_numpy(y @ theta)).item()
    assert got == pytest.approx(expected, abs=1e-12)


def test_sliced_wasserstein_translation_closed_form():
    # Projections of y = x + c are shifted by <c, theta>, so W1 = |<c, theta>| per direction, and
    # E|<c, theta>| = |c| E|cos phi| = 2|c|/pi for theta uniform on the circle.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 2))
    c = np.array([1.5, -0.7])
    value = metrics.sliced_wasserstein(x, x + c, n_projections=2048, seed=0)
    assert value == pytest.approx(2 * np.linalg.norm(c) / math.pi, rel=0.02)


def test_sliced_wasserstein_deterministic_and_no_global_rng():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(500, 2)), rng.normal(size=(500, 2)) + 0.3
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = metrics.sliced_wasserstein(x, y, seed=7)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    assert metrics.sliced_wasserstein(x, y, seed=7) == a
    assert metrics.sliced_wasserstein(x, y, seed=8) != a


def test_point_metrics_keys():
    rng = np.random.default_rng(3)
    s, ref, held = rng.normal(size=(200, 2)), rng.normal(size=(300, 2)), rng.normal(size=(250, 2))
    assert set(metrics.point_metrics(s, ref)) == {"nll"}
    out = metrics.point_metrics(s, ref, heldout=held)
    assert set(out) == {"nll", "energy_distance", "sliced_w1"}
    assert all(isinstance(v, float) and np.isfinite(v) for v in out.values())


# ----------------------------------------------------------------------------- plots


def _all_figures():
    rng = np.random.default_rng(0)
    pts, ref = rng.normal(size=(300, 2)), rng.normal(size=(500, 2))
    labels = rng.integers(0, 3, size=300)
    yield plots.plot_points(torch.from_numpy(pts), ref, title="pts")
    yield plots.plot_points(pts, ref, labels=labels, class_names=["a", "b", "c"])
    yield plots.plot_points_grid({"s0": pts, "s1": pts + 1, "s2": pts * 0.5}, ref, title="grid")
    yield plots.plot_hist1d(pts[:, 0], ref[:, 0], density_fn=ss.norm.pdf, bins=40, title="h")
    steps = np.arange(1000)
    yield plots.plot_loss_curve(steps, 1.0 / (1 + steps) + 0.1 * rng.random(1000), title="loss")
    yield plots.plot_trajectory([pts * s for s in np.linspace(3, 1, 10)], np.linspace(1, 0, 10))


def test_plots_return_figures_and_images():
    for fig in _all_figures():
        assert isinstance(fig, Figure)
        img = plots.figure_to_image(fig)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.std() > 5  # something was drawn, not a blank canvas


def test_save_figure_writes_readable_png(tmp_path):
    fig = plots.plot_points(np.random.default_rng(0).normal(size=(200, 2)), title="saved")
    path = tmp_path / "sub" / "points.png"
    plots.save_figure(fig, path)
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4) and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.02
    assert [p.name for p in path.parent.iterdir()] == ["points.png"]  # temp file renamed away
