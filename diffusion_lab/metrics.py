"""Sample-quality metrics for low-dimensional (1D/2D) generative models.

All functions accept torch tensors or numpy arrays of shape (N, D) or (N,) and return
python floats.  Computation is done in float64 so that results are comparable across runs
and match scipy reference implementations to ~1e-10.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import gaussian_kde

__all__ = ["kde_nll", "energy_distance", "sliced_wasserstein", "point_metrics"]

# Rows per chunk: keeps the (chunk x N) distance / kernel blocks at a few MB even for 5000x5000.
_CHUNK = 1024


def _as_2d_numpy(x, name: str) -> np.ndarray:
    """Convert a tensor/array to a float64 (N, D) numpy array; (N,) is treated as D=1."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, D) or (N,) with N > 0, got {x.shape}")
    return x


def _check_finite(x: np.ndarray, name: str) -> None:
    # A diverged sampler yields inf/nan rows; the KDE/distances would silently return nan/inf,
    # so fail loudly with the count instead.
    bad = int((~np.isfinite(x).all(axis=1)).sum())
    if bad:
        raise ValueError(f"{name} contains {bad} non-finite row(s) out of {x.shape[0]}")


def _prepare(x, y, names=("x", "y")) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_2d_numpy(x, names[0]), _as_2d_numpy(y, names[1])
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: {names[0]} has D={x.shape[1]}, {names[1]} has D={y.shape[1]}")
    _check_finite(x, names[0])
    _check_finite(y, names[1])
    return x, y


def kde_nll(samples, reference) -> float:
    """CSE849 STATES protocol: mean of -log p_KDE(samples), gaussian_kde (Scott bw) fit on reference."""
    samples, reference = _prepare(samples, reference, ("samples", "reference"))
    # gaussian_kde expects (D, N); default bw_method is Scott's rule n**(-1/(D+4)).
    kde = gaussian_kde(reference.T)
    total = 0.0
    for start in range(0, samples.shape[0], _CHUNK):
        # logpdf uses log-sum-exp internally, so far-away samples give large finite values
        # instead of log(0) = -inf.
        total += float(-kde.logpdf(samples[start : start + _CHUNK].T).sum())
    return total / samples.shape[0]


def _mean_pairwise_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean Euclidean distance over all (i, j) pairs, including i == j (V-statistic)."""
    total = 0.0
    for start in range(0, a.shape[0], _CHUNK):
        total += torch.cdist(a[start : start + _CHUNK], b).sum().item()
    return total / (a.shape[0] * b.shape[0])


def energy_distance(x, y) -> float:
    """Squared energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (Euclidean norm, V-statistic).

    The V-statistic averages over all pairs including i == j, which makes it exactly
    ``scipy.stats.energy_distance(x, y) ** 2`` in 1D and always >= 0.
    """
    # Hand-written because scipy.stats.energy_distance only supports 1D samples.
    x, y = _prepare(x, y)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    value = (
        2.0 * _mean_pairwise_distance(xt, yt)
        - _mean_pairwise_distance(xt, xt)
        - _mean_pairwise_distance(yt, yt)
    )
    # Clip tiny negative values from float round-off (the V-statistic is >= 0 in exact arithmetic).
    return max(value, 0.0)


def _w1_1d(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Exact W1 between empirical measures, per column: integral_0^1 |F^-1(u) - G^-1(u)| du."""
    n, m = px.shape[0], py.shape[0]
    xs, _ = torch.sort(px, dim=0)
    ys, _ = torch.sort(py, dim=0)
    if n == m:
        return (xs - ys).abs().mean(dim=0)
    # Unequal sizes: both quantile functions are piecewise constant with breaks at i/n and j/m.
    # Work on the integer grid k/(n*m) so the union of breakpoints is exact (no float ties).
    breaks = np.union1d(np.arange(n + 1) * m, np.arange(m + 1) * n)
    left, width = breaks[:-1], np.diff(breaks)
    ix = torch.from_numpy(left // m)  # quantile index of x on [left, left + width)
    iy = torch.from_numpy(left // n)
    w = torch.from_numpy(width / (n * m)).to(px.dtype)
    return ((xs[ix] - ys[iy]).abs() * w[:, None]).sum(dim=0)


def sliced_wasserstein(x, y, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced W1: mean over random unit directions theta of W1(<x, theta>, <y, theta>); exact W1 in 1D."""
    x, y = _prepare(x, y)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    d = x.shape[1]
    if d == 1:
        return float(_w1_1d(xt, yt).item())
    # Private generator: reproducible for a given seed and never perturbs the global RNG
    # (which would change training randomness whenever metrics are logged).
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(d, n_projections, generator=gen, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)  # normalised Gaussians are uniform on the sphere
    return float(_w1_1d(xt @ theta, yt @ theta).mean().item())


def point_metrics(samples, reference, heldout=None) -> dict[str, float]:
    """KDE NLL w.r.t. reference, plus energy distance and sliced W1 to heldout points if given."""
    out = {"nll": kde_nll(samples, reference)}
    if heldout is not None:
        out["energy_distance"] = energy_distance(samples, heldout)
        out["sliced_w1"] = sliced_wasserstein(samples, heldout)
    return out


def nearest_label(samples, reference, reference_labels, chunk: int = 4096) -> torch.Tensor:
    """Label of each sample's nearest reference point (a bandwidth-free 1-NN judge of conditional samples)."""
    x = torch.as_tensor(_as_2d_numpy(samples, "samples"), dtype=torch.float64)
    ref = torch.as_tensor(_as_2d_numpy(reference, "reference"), dtype=torch.float64)
    ref_labels = torch.as_tensor(np.asarray(reference_labels)).reshape(-1)
    if len(ref_labels) != len(ref):
        raise ValueError(f"reference has {len(ref)} points but {len(ref_labels)} labels")
    idx = torch.cat([torch.cdist(x[i: i + chunk], ref).argmin(1) for i in range(0, len(x), chunk)])
    return ref_labels[idx]


def class_metrics(samples, labels, reference, reference_labels, class_names) -> dict[str, float]:
    """Per requested class c (labels >= 0): NLL under the KDE of all true points (the STATES protocol),
    NLL under the KDE of class c's own true points, and the share of samples whose nearest true point
    is in class c; plus the worst per-class NLL and the mean accuracy."""
    x = _as_2d_numpy(samples, "samples")
    labels = np.asarray(labels).reshape(-1)
    ref_labels = np.asarray(reference_labels).reshape(-1)
    ref = _as_2d_numpy(reference, "reference")
    near = nearest_label(x, ref, ref_labels).numpy()
    out: dict[str, float] = {}
    accs, nlls = [], []
    for c in sorted(int(v) for v in np.unique(labels) if v >= 0):
        m, name = labels == c, class_names[c]
        nlls.append(kde_nll(x[m], ref))
        out[f"nll/{name}"] = nlls[-1]
        out[f"nll_own/{name}"] = kde_nll(x[m], ref[ref_labels == c])
        accs.append(float((near[m] == c).mean()))
        out[f"accuracy/{name}"] = accs[-1]
    if nlls:
        out["nll_class_max"] = max(nlls)
        out["accuracy"] = float(np.mean(accs))
    return out
