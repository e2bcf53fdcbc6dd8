"""Tests for diffusion_lab.data.points (STATES toy, file loading, classic toys)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_lab.data import points as P

OUTLINES_JSON = Path(__file__).resolve().parents[2] / "shared/data/states/state_outlines.json"


def _square(lon0, lat0, w, h):
    return [[lon0, lat0], [lon0 + w, lat0], [lon0 + w, lat0 + h], [lon0, lat0 + h], [lon0, lat0]]


# Synthetic outlines so the geometry tests run without the shared data. Michigan's second ring has
# a third of the first ring's perimeter, so it must get 250 of 1000 points.
SYNTH = {
    "Ohio": [_square(-84, 38, 4, 4)],
    "Wisconsin": [_square(-92, 42, 5, 4)],
    "Oklahoma": [[[-103, 34], [-94, 34], [-94, 37], [-103, 37.5], [-103, 34]]],
    "Idaho": [_square(-117, 42, 5, 7)],
    "Michigan": [_square(-86, 42, 3, 3), _square(-89, 46, 1, 1)],
}


def _dist_to_polyline(pts, ring):
    a, b = ring[:-1], ring[1:]
    ab = b - a
    t = np.clip(((pts[:, None] - a) * ab).sum(-1) / np.maximum((ab**2).sum(-1), 1e-300), 0, 1)
    return np.linalg.norm(pts[:, None] - (a + t[..., None] * ab), axis=-1).min(1)


def _check_states(data, labels, names):
    assert data.dtype == np.float32 and data.shape == (5000, 2)
    assert labels.dtype == np.int64 and np.array_equal(np.bincount(labels), [1000] * 5)
    assert names == ["Ohio", "Wisconsin", "Oklahoma", "Idaho", "Michigan"]
    np.testing.assert_allclose(data.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(data.std(0), 1, atol=1e-5)
    # Angle measured clockwise from +y: should be ~0, 72, 144, 216, 288 degrees in label order.
    c = np.stack([data[labels == k].mean(0) for k in range(5)])
    cw = np.degrees(np.arctan2(c[:, 0], c[:, 1])) % 360
    cw[0] = (cw[0] + 180) % 360 - 180  # Ohio may sit just left of the +y axis
    assert np.all(np.diff(cw) > 0), cw
    np.testing.assert_allclose(cw, [0, 72, 144, 216, 288], atol=10)


def test_shipped_states_asset():
    _check_states(*P.load_states_asset())


def test_synthetic_states_geometry():
    data, labels, rings = P._build_states(SYNTH, 1000, 0.01, seed=3)
    _check_states(data, labels, P.STATE_NAMES)
    for k, state_rings in enumerate(rings):
        pts = data[labels == k].astype(np.float64)
        size = max(np.linalg.norm(r - r.mean(0), axis=1).max() for r in state_rings)
        d = np.stack([_dist_to_polyline(pts, r) for r in state_rings])
        assert d.min(0).max() < 0.1 * size
        if k == 4:  # Michigan: points split over rings in proportion to perimeter (3:1)
            assert np.bincount(d.argmin(0), minlength=2).tolist() == [750, 250]


def test_states_reproducible_and_validated():
    a = P.build_states(SYNTH, 100, seed=1)
    b = P.build_states(SYNTH, 100, seed=1)
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], P.build_states(SYNTH, 100, seed=2)[0])
    with pytest.raises(ValueError, match="Idaho"):
        P.build_states({k: v for k, v in SYNTH.items() if k != "Idaho"})


def test_real_outlines_close_and_rebuild_matches_asset():
    if not OUTLINES_JSON.exists():
        pytest.skip(f"{OUTLINES_JSON} not available")
    outlines = json.loads(OUTLINES_JSON.read_text())
    data, labels, rings = P._build_states(outlines, 1000, 0.01, 0)
    for k, state_rings in enumerate(rings):
        pts = data[labels == k].astype(np.float64)
        size = max(np.linalg.norm(r - r.mean(0), axis=1).max() for r in state_rings)
        d = np.stack([_dist_to_polyline(pts, r) for r in state_rings]).min(0)
        assert d.max() < 0.1 * size and d.mean() < 0.03 * size
    shipped = P.load_states_asset()
    rebuilt = P.build_states(outlines)
    assert np.array_equal(rebuilt[0], shipped[0]) and np.array_equal(rebuilt[1], shipped[1])
    assert rebuilt[2] == shipped[2]


def test_load_points_file_round_trip(tmp_path):
    data = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32)
    labels = np.arange(50) % 3
    torch.save({"data": torch.from_numpy(data), "labels": torch.from_numpy(labels)}, tmp_path / "p.pt")
    d, lab, n = P.load_points_file(tmp_path / "p.pt")
    assert np.array_equal(d, data) and np.array_equal(lab, labels) and lab.dtype == np.int64 and n is None
    np.savez(tmp_path / "p.npz", data=data, labels=labels, label_names=np.array(["a", "b", "c"]))
    d, lab, n = P.load_points_file(tmp_path / "p.npz")
    assert np.array_equal(d, data) and np.array_equal(lab, labels) and n == ["a", "b", "c"]


def test_load_points_file_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, data=np.zeros((10, 2, 1)), labels=np.zeros(10, dtype=np.int64))
    with pytest.raises(ValueError, match="bad.npz.*shape"):
        P.load_points_file(bad)
    torch.save({"data": torch.zeros(10, 2), "labels": torch.zeros(9, dtype=torch.long)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt"):
        P.load_points_file(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        P.load_points_file(tmp_path / "missing.pt")


def test_gmm1d_moments():
    means, stds, weights = [-2.0, 1.0, 4.0], [0.5, 1.0, 0.3], [2.0, 1.0, 1.0]
    x, comp = P.sample_gmm1d(200_000, means, stds, weights, seed=0)
    assert x.shape == (200_000, 1) and x.dtype == np.float32 and comp.dtype == np.int64
    w = np.array(weights) / sum(weights)
    mu = (w * means).sum()
    var = (w * (np.square(stds) + np.square(means))).sum() - mu**2
    assert abs(x.mean() - mu) < 0.02 and abs(x.var() - var) / var < 0.01
    np.testing.assert_allclose(np.bincount(comp) / len(comp), w, atol=0.005)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(means=[0, 1], stds=[1], weights=[1, 1]), "lengths"),
        (dict(means=[0, 1], stds=[1, 0], weights=[1, 1]), "stds"),
        (dict(means=[0, 1], stds=[1, 1], weights=[1, -1]), "weights"),
        (dict(means=[0, 1], stds=[1, 1], weights=[0, 0]), "weights"),
    ],
)
def test_gmm1d_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        P.sample_gmm1d(10, seed=0, **kwargs)


def test_classic_toys():
    x, y = P.sample_moons(100_000, noise=0.1, seed=0)
    assert x.shape == (100_000, 2) and x.dtype == np.float32 and np.bincount(y).tolist() == [50_000] * 2
    np.testing.assert_allclose(x.mean(0), 0, atol=0.02)
    assert abs(x.var(0).mean() - 1) < 0.02
    x, y = P.sample_eight_gaussians(80_000, radius=2.0, seed=0)
    assert x.shape == (80_000, 2) and set(np.unique(y)) == set(range(8))
    centres = 2.0 * np.stack([np.cos(np.pi * y / 4), np.sin(np.pi * y / 4)], 1)
    assert np.abs(x - centres).max() < 0.04 * 6
    x, y = P.sample_swiss_roll(100_000, noise=0.5, seed=0)
    assert x.shape == (100_000, 2) and y is None
    np.testing.assert_allclose(x.mean(0), 0, atol=0.02)
    assert abs(x.var(0).mean() - 1) < 0.02
    assert np.array_equal(P.sample_swiss_roll(10, seed=1)[0], P.sample_swiss_roll(10, seed=1)[0])
