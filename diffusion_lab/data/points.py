"""Low-dimensional point datasets (pure numpy; no Lightning).

All generators return ``(data, labels)`` as numpy arrays: ``data`` float32 of shape (N, D) and
``labels`` int64 of shape (N,) or ``None``. Every function takes an explicit ``seed`` and draws from
its own ``numpy.random.Generator`` so results never depend on global RNG state.

STATES is the CSE849 2D toy (five US state outlines arranged on a circle), re-derived from
public-domain Census outlines; the built set ships as ``assets/states.npz``. Rebuild it with::

    python -m diffusion_lab.data.points build-states \
        --outlines ../shared/data/states/state_outlines.json --out diffusion_lab/data/assets/states.npz
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

STATE_NAMES = ["Ohio", "Wisconsin", "Oklahoma", "Idaho", "Michigan"]
STATES_ASSET = Path(__file__).resolve().parent / "assets" / "states.npz"
# Each state's max radius (centroid to farthest outline point) relative to the arrangement circle.
# Neighbours are 72 deg apart, i.e. 2*sin(36 deg) = 1.176 radii, so any value < 0.588 keeps the
# states disjoint; 0.56 gives per-state std ~0.25-0.4 per axis and a KDE self-score ~2.1 like the
# course data.
_STATE_SIZE = 0.56


# ----------------------------------------------------------------------------------------- STATES
def _close(ring) -> np.ndarray:
    ring = np.asarray(ring, dtype=np.float64)
    if ring.ndim != 2 or ring.shape[1] != 2 or len(ring) < 3:
        raise ValueError(f"each ring must be a list of >= 3 [lon, lat] pairs, got shape {ring.shape}")
    return ring if np.array_equal(ring[0], ring[-1]) else np.vstack([ring, ring[:1]])


def _seg_lengths(ring: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.diff(ring, axis=0), axis=1)


def _sample_ring(ring: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Draw k points uniformly by arc length along a closed polyline."""
    lengths = _seg_lengths(ring)
    cum = np.concatenate([[0.0], np.cumsum(lengths)])
    s = rng.uniform(0.0, cum[-1], size=k)
    # side="right" never lands on a zero-length segment (its [cum_i, cum_i+1) interval is empty).
    idx = np.clip(np.searchsorted(cum, s, side="right") - 1, 0, len(lengths) - 1)
    frac = (s - cum[idx]) / np.maximum(lengths[idx], 1e-300)
    return ring[idx] + frac[:, None] * (ring[idx + 1] - ring[idx])


def _split_counts(n: int, weights: np.ndarray) -> np.ndarray:
    """Split n into integer counts proportional to weights (largest remainder, deterministic)."""
    raw = n * weights / weights.sum()
    counts = np.floor(raw).astype(np.int64)
    counts[np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]] += 1
    return counts


def _normalised_state(rings: list[np.ndarray]) -> list[np.ndarray]:
    """Project a state locally, centre it on its outline centroid and scale its max radius to 1."""
    # Local equirectangular projection: scaling lon by cos(mean lat) keeps the shape undistorted.
    mean_lat = np.mean(np.concatenate([r[:, 1] for r in rings]))
    rings = [r * np.array([np.cos(np.radians(mean_lat)), 1.0]) for r in rings]
    # Arc-length-weighted centroid of the outline itself (not the enclosed area), so the sampled
    # points -- uniform in arc length -- have their mean at the state's anchor on the circle.
    lengths = np.concatenate([_seg_lengths(r) for r in rings])
    mids = np.concatenate([(r[:-1] + r[1:]) / 2 for r in rings])
    centre = (lengths[:, None] * mids).sum(0) / lengths.sum()
    # The farthest outline point is a vertex; normalising it bounds each state by a known disc.
    radius = max(np.linalg.norm(r - centre, axis=1).max() for r in rings)
    return [(r - centre) / radius for r in rings]


def _build_states(
    outlines: dict, points_per_state: int, jitter: float, seed: int
) -> tuple[np.ndarray, np.ndarray, list[list[np.ndarray]]]:
    """Like build_states but also returns each state's rings in the final (standardised) frame."""
    missing = [s for s in STATE_NAMES if s not in outlines]
    if missing:
        raise ValueError(f"outlines is missing states {missing}; expected keys {STATE_NAMES}")
    if points_per_state < 1 or jitter < 0:
        raise ValueError(f"need points_per_state >= 1 and jitter >= 0, got {points_per_state}, {jitter}")
    rng = np.random.default_rng(seed)
    data, labels, placed = [], [], []
    for label, name in enumerate(STATE_NAMES):
        # Clockwise from the top: Ohio at 90 deg, then every 72 deg clockwise on the unit circle.
        angle = np.radians(90.0 - 72.0 * label)
        anchor = np.array([np.cos(angle), np.sin(angle)])
        rings = [r * _STATE_SIZE + anchor for r in _normalised_state([_close(r) for r in outlines[name]])]
        counts = _split_counts(points_per_state, np.array([_seg_lengths(r).sum() for r in rings]))
        pts = np.concatenate([_sample_ring(r, k, rng) for r, k in zip(rings, counts)])
        data.append(pts + rng.normal(0.0, jitter * _STATE_SIZE, size=pts.shape))
        labels.append(np.full(len(pts), label, dtype=np.int64))
        placed.append(rings)
    data = np.concatenate(data)
    mean, std = data.mean(0), data.std(0)
    placed = [[(r - mean) / std for r in rings] for rings in placed]
    return ((data - mean) / std).astype(np.float32), np.concatenate(labels), placed


def build_states(
    outlines: dict, points_per_state: int = 1000, jitter: float = 0.01, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Build the STATES toy from {state: [ring of [lon, lat]]}; returns (data, labels, names)."""
    data, labels, _ = _build_states(outlines, points_per_state, jitter, seed)
    return data, labels, list(STATE_NAMES)


def load_points_file(path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Load (data, labels, label_names or None) from a .pt dict or .npz with keys data, labels."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"points file {path} does not exist (expected a .pt or .npz with data, labels)"
        )
    if path.suffix == ".pt":
        import torch  # local import: the rest of this module needs numpy only

        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a dict with keys 'data', 'labels', got {type(obj).__name__}")
        get = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in obj.items()}
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            get = {k: z[k] for k in z.files}
    else:
        raise ValueError(f"{path}: unsupported extension {path.suffix!r}, expected .pt or .npz")
    if "data" not in get or "labels" not in get:
        raise ValueError(f"{path}: expected keys 'data' and 'labels', found {sorted(get)}")
    data, labels = np.asarray(get["data"]), np.asarray(get["labels"])
    if data.ndim != 2 or labels.shape != (len(data),):
        raise ValueError(
            f"{path}: expected data of shape (N, D) and labels of shape (N,), "
            f"got data {data.shape} and labels {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: expected integer labels, got dtype {labels.dtype}")
    bad = ~np.isfinite(data.astype(np.float64)).all(1)
    if bad.any():  # one NaN row would make every loss NaN after hours of "training"
        raise ValueError(f"{path}: {int(bad.sum())} rows hold NaN or inf (first: row {int(np.argmax(bad))})")
    names = get.get("label_names")
    names = None if names is None else [str(s) for s in np.asarray(names).tolist()]
    return data.astype(np.float32), labels.astype(np.int64), names


def split_heldout(data: np.ndarray, labels: np.ndarray | None, fraction: float, seed: int = 0):
    """Seeded held-out split: `fraction` of each class (of all points when unlabelled) -> (train, heldout) index
    arrays, both sorted. Per class, so the held-out part has the data's class balance."""
    if not 0 < fraction < 1:
        raise ValueError(f"heldout_fraction={fraction}: expected a fraction in (0, 1)")
    rng = np.random.default_rng(seed)
    groups = [np.arange(len(data))] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    held = []
    for idx in groups:
        k = int(round(fraction * len(idx)))
        if k < 1 or k >= len(idx):
            raise ValueError(f"heldout_fraction={fraction}: leaves no training or no held-out point in a group "
                             f"of {len(idx)}")
        held.append(rng.choice(idx, size=k, replace=False))
    held = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(data)), held), held


def load_states_asset() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load the shipped STATES dataset (5000 x 2, labels 0 Ohio .. 4 Michigan)."""
    data, labels, names = load_points_file(STATES_ASSET)
    return data, labels, names if names is not None else list(STATE_NAMES)


# ------------------------------------------------------------------------------------ classic toys
def sample_gmm1d(
    n: int,
    means: Sequence[float],
    stds: Sequence[float],
    weights: Sequence[float] | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample n points (N, 1) from a 1D Gaussian mixture; labels are component indices."""
    means, stds = np.asarray(means, np.float64), np.asarray(stds, np.float64)
    weights = np.ones_like(means) if weights is None else np.asarray(weights, np.float64)
    if means.ndim != 1 or len(means) == 0:
        raise ValueError(f"means must be a non-empty 1D sequence, got shape {means.shape}")
    if stds.shape != means.shape or weights.shape != means.shape:
        raise ValueError(
            f"means, stds and weights must have equal lengths, got {len(means)}, {stds.size}, {weights.size}"
        )
    if not np.all(stds > 0):
        raise ValueError(f"stds must all be > 0, got {stds.tolist()}")
    if not np.all(weights >= 0) or not weights.sum() > 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {weights.tolist()}")
    rng = np.random.default_rng(seed)
    comp = rng.choice(len(means), size=n, p=weights / weights.sum())
    x = means[comp] + stds[comp] * rng.standard_normal(n)
    return x[:, None].astype(np.float32), comp.astype(np.int64)


def sample_moons(n: int, noise: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaving half circles (label 0 upper, 1 lower), centred and isotropically scaled."""
    rng = np.random.default_rng(seed)
    n0 = n // 2
    t = rng.uniform(0.0, np.pi, size=n)
    upper = np.stack([np.cos(t), np.sin(t)], 1)
    lower = np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], 1)
    labels = (np.arange(n) >= n0).astype(np.int64)
    x = np.where(labels[:, None] == 0, upper, lower) + noise * rng.standard_normal((n, 2))
    # Fixed affine from the distribution's analytic moments (not the sample's), so every draw comes
    # from the same law; one scalar scale keeps the aspect ratio. Mean (1/2, 1/4), per-axis
    # variances 3/4 and 9/16 - 1/pi, plus noise^2 each; result: mean 0, mean per-axis variance 1.
    var = (0.75 + (0.5625 - 1.0 / np.pi)) / 2 + noise**2
    return ((x - np.array([0.5, 0.25])) / np.sqrt(var)).astype(np.float32), labels


def sample_eight_gaussians(
    n: int, radius: float = 2.0, std: float | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Eight Gaussians on a circle of `radius` (std defaults to 0.02*radius); label = which one."""
    # Not rescaled: radius/std are explicit geometry. Mean is 0 by symmetry; per-axis variance is
    # radius^2/2 + std^2 (about 2 for the defaults).
    std = 0.02 * radius if std is None else std
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 8, size=n)
    angle = 2 * np.pi * labels / 8
    x = radius * np.stack([np.cos(angle), np.sin(angle)], 1) + std * rng.standard_normal((n, 2))
    return x.astype(np.float32), labels.astype(np.int64)


def sample_swiss_roll(n: int, noise: float = 0.5, seed: int = 0) -> tuple[np.ndarray, None]:
    """2D swiss roll (t cos t, t sin t), t ~ U[1.5pi, 4.5pi], noise in raw units; centred and scaled."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(1.5 * np.pi, 4.5 * np.pi, size=n)
    x = np.stack([t * np.cos(t), t * np.sin(t)], 1) + noise * rng.standard_normal((n, 2))
    # Same convention as sample_moons, closed form for t ~ U[1.5pi, 4.5pi]: E[t cos t] = 2,
    # E[t sin t] = 2/(3pi), E[t^2] = 9.75 pi^2 -> mean per-axis variance (E t^2 - |mean|^2) / 2.
    mean = np.array([2.0, 2.0 / (3 * np.pi)])
    var = (9.75 * np.pi**2 - (mean**2).sum()) / 2 + noise**2
    return ((x - mean) / np.sqrt(var)).astype(np.float32), None


# --------------------------------------------------------------------------------------------- CLI
def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffusion_lab.data.points")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-states", help="build the STATES toy .npz from state outlines json")
    b.add_argument("--outlines", required=True, type=Path)
    b.add_argument("--out", required=True, type=Path)
    b.add_argument("--points-per-state", type=int, default=1000)
    b.add_argument("--jitter", type=float, default=0.01)
    b.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    outlines = json.loads(args.outlines.read_text())
    data, labels, names = build_states(outlines, args.points_per_state, args.jitter, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, data=data, labels=labels, label_names=np.array(names))
    print(f"wrote {args.out}: data {data.shape} {data.dtype}, {len(names)} classes {names}")


if __name__ == "__main__":
    _main()
