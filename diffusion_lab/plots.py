"""Headless matplotlib figures for sample inspection and TensorBoard logging.

Figures are built with ``matplotlib.figure.Figure`` + the Agg canvas directly instead of
pyplot: no display is needed, the process-global backend is never switched, and figures are
not registered in pyplot's global registry (so forgetting to close one cannot leak memory in
long training runs).  No function ever calls ``plt.show``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from diffusion_lab.fileio import atomic_path

__all__ = [
    "save_figure",
    "figure_to_image",
    "plot_points",
    "plot_points_grid",
    "plot_hist1d",
    "plot_loss_curve",
    "plot_trajectory",
]

_REF_STYLE = dict(s=2, c="0.8", alpha=0.5, linewidths=0, rasterized=True)
_SAMPLE_STYLE = dict(s=3, alpha=0.5, linewidths=0, rasterized=True)


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _new_figure(figsize=(5.0, 5.0)) -> Figure:
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)  # attaches the Agg canvas to fig (fig.canvas)
    return fig


def _limits(*arrays, pad: float = 0.1) -> tuple[tuple[float, float], tuple[float, float]]:
    """Shared (xlim, ylim) from the finite points of all arrays, so panels are comparable."""
    pts = np.concatenate([a.reshape(-1, 2) for a in arrays if a is not None and a.size])
    pts = pts[np.isfinite(pts).all(axis=1)]
    if not len(pts):
        return (-1.0, 1.0), (-1.0, 1.0)
    # Percentiles rather than min/max: a handful of diverged samples should not squash the plot.
    lo, hi = np.percentile(pts, 0.5, axis=0), np.percentile(pts, 99.5, axis=0)
    span = np.maximum(hi - lo, 1e-6)
    lo, hi = lo - pad * span, hi + pad * span
    return (lo[0], hi[0]), (lo[1], hi[1])


def save_figure(fig: Figure, path) -> None:
    """Write fig as PNG (dpi 120, tight bbox) atomically via temp file + os.replace, then close it."""
    try:
        # Temp file in the same directory so the rename is atomic: readers (TensorBoard, a report builder)
        # never see a half-written PNG.
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
    finally:
        # Only touch pyplot if the caller already uses it (it may own this figure).
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close(fig)


def figure_to_image(fig: Figure) -> np.ndarray:
    """Render fig to a uint8 (H, W, 3) RGB array for SummaryWriter.add_image(..., dataformats='HWC')."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _scatter(ax, samples, reference=None, labels=None, class_names=None) -> None:
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], **_REF_STYLE)
    if labels is None:
        ax.scatter(samples[:, 0], samples[:, 1], color="C0", **_SAMPLE_STYLE)
    else:
        labels = _np(labels).astype(int).reshape(-1)
        for i, lab in enumerate(np.unique(labels)):
            m = labels == lab
            name = class_names[lab] if class_names is not None else str(lab)
            ax.scatter(samples[m, 0], samples[m, 1], color=f"C{i % 10}", label=name, **_SAMPLE_STYLE)
        ax.legend(markerscale=4, fontsize="small", loc="best")
    ax.set_aspect("equal")


def plot_points(samples, reference=None, labels=None, class_names=None, title: str = "") -> Figure:
    """2D scatter of samples over reference points (grey), optionally coloured by class label."""
    samples = _np(samples).reshape(-1, 2)
    reference = None if reference is None else _np(reference).reshape(-1, 2)
    fig = _new_figure()
    ax = fig.add_subplot()
    _scatter(ax, samples, reference, labels, class_names)
    xlim, ylim = _limits(samples, reference)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_title(title)
    return fig


def plot_points_grid(panels: Mapping[str, object], reference=None, title: str = "") -> Figure:
    """One 2D scatter per named panel (e.g. per-state samples) with shared axis limits."""
    panels = {k: _np(v).reshape(-1, 2) for k, v in panels.items()}
    reference = None if reference is None else _np(reference).reshape(-1, 2)
    n = max(len(panels), 1)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig = _new_figure((3.2 * ncols, 3.2 * nrows + 0.4))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True).ravel()
    # Limits follow the reference when available: the question is "does each panel match the data".
    xlim, ylim = _limits(reference) if reference is not None else _limits(*panels.values())
    for ax, (name, pts) in zip(axes, panels.items()):
        _scatter(ax, pts, reference)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_title(name, fontsize="small")
    for i, ax in enumerate(axes):
        if i >= len(panels):
            ax.set_visible(False)
        elif i + ncols >= len(panels):  # last panel in its column: keep x tick labels (sharex hides them)
            ax.tick_params(labelbottom=True)
    fig.suptitle(title)
    return fig


def plot_hist1d(
    samples,
    reference=None,
    density_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    bins: int = 100,
    title: str = "",
) -> Figure:
    """Density histogram of 1D samples with reference histogram outline and optional true density."""
    samples = _np(samples).reshape(-1)
    samples = samples[np.isfinite(samples)]
    reference = None if reference is None else _np(reference).reshape(-1)
    basis = reference if reference is not None else samples
    lo, hi = np.percentile(basis, [0.1, 99.9]) if basis.size else (-1.0, 1.0)
    pad = 0.1 * max(hi - lo, 1e-6)
    # Common bin edges so sample and reference bars are directly comparable.
    edges = np.linspace(lo - pad, hi + pad, bins + 1)
    fig = _new_figure((6.0, 4.0))
    ax = fig.add_subplot()
    ax.hist(samples, bins=edges, density=True, alpha=0.5, color="C0", label="samples")
    if reference is not None:
        ax.hist(reference, bins=edges, density=True, histtype="step", color="k", label="reference")
    if density_fn is not None:
        grid = np.linspace(edges[0], edges[-1], 512)
        ax.plot(grid, np.asarray(density_fn(grid)), color="C3", lw=1.5, label="true density")
    ax.set_xlim(edges[0], edges[-1])
    ax.legend(fontsize="small")
    ax.set_title(title)
    return fig


def plot_loss_curve(steps: Sequence[float], losses: Sequence[float], title: str = "",
                    val: tuple[Sequence[float], Sequence[float]] | None = None) -> Figure:
    """Training loss vs step on a log y-axis with a trailing moving average; `val` = (steps, losses)."""
    steps, losses = _np(steps).reshape(-1), _np(losses).reshape(-1)
    fig = _new_figure((6.0, 4.0))
    ax = fig.add_subplot()
    ax.plot(steps, losses, color="C0", alpha=0.3, lw=0.8, label="loss")
    window = max(1, len(losses) // 50)
    if window > 1:
        # Diffusion losses are very noisy (random t per batch); the average shows the trend.
        ma = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], ma, color="C1", lw=1.5, label=f"moving avg ({window})")
    if val is not None and len(val[0]):
        ax.plot(_np(val[0]).reshape(-1), _np(val[1]).reshape(-1), "o-", color="C2", ms=3, lw=1.2,
                label="validation")
    if np.any(losses > 0):
        ax.set_yscale("log")  # non-positive values are masked by matplotlib on a log axis
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize="small")
    ax.set_title(title)
    return fig


def plot_trajectory(
    traj: Sequence[object], times: Sequence[float], max_panels: int = 6, title: str = ""
) -> Figure:
    """Snapshots of (N, 2) samples along the reverse process, side by side with shared limits."""
    if len(traj) != len(times):
        raise ValueError(f"got {len(traj)} snapshots but {len(times)} times")
    if not len(traj):
        raise ValueError("traj is empty")
    # Evenly spaced snapshots always including the first (noise) and last (data) states.
    idx = np.unique(np.linspace(0, len(traj) - 1, min(max_panels, len(traj))).round().astype(int))
    snaps = [_np(traj[i]).reshape(-1, 2) for i in idx]
    fig = _new_figure((3.0 * len(idx), 3.4))
    axes = fig.subplots(1, len(idx), squeeze=False, sharex=True, sharey=True).ravel()
    xlim, ylim = _limits(*snaps)
    for ax, i, pts in zip(axes, idx, snaps):
        ax.scatter(pts[:, 0], pts[:, 1], color="C0", **_SAMPLE_STYLE)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_aspect("equal")
        ax.set_title(f"t = {float(times[i]):.3g}", fontsize="small")
    fig.suptitle(title)
    return fig


def render_samples(samples, datamodule, labels=None, title: str = "") -> Figure:
    """The natural picture of low-dimensional samples: a histogram in 1D, a scatter over the data in 2D."""
    if datamodule.dim == 1:
        return plot_hist1d(samples, reference=datamodule.reference(),
                           density_fn=getattr(datamodule, "density", None), title=title)
    names = getattr(datamodule, "class_names", None)
    return plot_points(samples, reference=datamodule.reference(), labels=labels, class_names=names, title=title)


def plot_prediction_maps(predict, reference, labels, ts: Sequence[float], class_names=None,
                         resolution: int = 200, title: str = "") -> Figure:
    """A 2D classifier's argmax class over the plane at several noise levels t (one panel per t).

    `predict(xy (M, 2), t float) -> probabilities (M, C)`; colour = class, lightness = confidence;
    the true points are overlaid in their class colours.
    """
    from matplotlib.colors import to_rgb

    reference = _np(reference).reshape(-1, 2)
    labels = _np(labels).astype(int).reshape(-1)
    (x0, x1), (y0, y1) = _limits(reference, pad=0.25)
    gx, gy = np.meshgrid(np.linspace(x0, x1, resolution), np.linspace(y0, y1, resolution))
    grid = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float32)
    ncols = min(len(ts), 3)
    nrows = math.ceil(len(ts) / ncols)
    fig = _new_figure((3.4 * ncols, 3.4 * nrows + 0.4))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, t in zip(axes, ts):
        probs = _np(predict(grid, float(t)))
        colours = np.array([to_rgb(f"C{c % 10}") for c in range(probs.shape[1])])
        conf = probs.max(1, keepdims=True)
        rgb = 1 - conf * (1 - colours[probs.argmax(1)])  # white at 0 confidence, the class colour at 1
        ax.imshow(rgb.reshape(resolution, resolution, 3), origin="lower", extent=(x0, x1, y0, y1), aspect="equal")
        for c in np.unique(labels):
            m = labels == c
            name = class_names[c] if class_names is not None else str(c)
            ax.scatter(reference[m, 0], reference[m, 1], s=0.3, color=f"C{c % 10}",
                       edgecolors="black", linewidths=0.05, label=name)
        ax.set_title(f"t = {t:g}", fontsize="small")
    for ax in axes[len(ts):]:
        ax.set_visible(False)
    axes[0].legend(markerscale=8, fontsize="x-small", loc="best")
    fig.suptitle(title)
    return fig


def plot_metric_series(series: Mapping[str, Sequence[tuple]], xlabel: str, ylabel: str, numeric: bool = True,
                       title: str = "", logx: bool = False) -> Figure:
    """Sweep results: {label: [(x, y) or (x, y, yerr), ...]} as lines over numeric x (sorted; log x for
    quantities spanning decades: NFE, training FLOPs), or grouped bars otherwise, the categories in the order
    they first appear (the sweep's own order, eps, x0, v; not alphabetical). yerr (std over seeds) is drawn
    as error bars."""
    fig = _new_figure((6.0, 4.0))
    ax = fig.add_subplot()
    if numeric:
        for i, (label, pts) in enumerate(series.items()):
            pts = sorted((float(p[0]), float(p[1]), float(p[2]) if len(p) > 2 else 0.0) for p in pts)
            yerr = [p[2] for p in pts] if any(p[2] for p in pts) else None  # no caps without a spread
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=yerr, fmt="o-", color=f"C{i % 10}",
                        label=label, capsize=3)
    else:
        cats = list(dict.fromkeys(str(p[0]) for pts in series.values() for p in pts))
        width = 0.8 / max(len(series), 1)
        for i, (label, pts) in enumerate(series.items()):
            values = {str(p[0]): (float(p[1]), float(p[2]) if len(p) > 2 else 0.0) for p in pts}
            xs = [j + i * width for j, c in enumerate(cats) if c in values]
            yerr = [values[c][1] for c in cats if c in values]
            ax.bar(xs, [values[c][0] for c in cats if c in values], width=width, color=f"C{i % 10}", label=label,
                   yerr=yerr if any(yerr) else None, capsize=3)
        ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(cats))], cats)
    if numeric and logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(fontsize="small")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def plot_sample_table(rows: Mapping[str, Sequence[tuple[str, object]]], title: str = "") -> Figure:
    """One panel per setting, side by side: {row label: [(panel title, uint8 (H, W, C) image or (N, 2)
    points), ...]} (CMU 10-799 HW1 Q7: one sample per number of sampling steps, a row per sampler)."""
    ncols = max(len(panels) for panels in rows.values())
    fig = _new_figure((1.6 * ncols + 0.8, 1.7 * len(rows) + 0.5))
    points = [_np(v) for panels in rows.values() for _, v in panels
              if not (isinstance(v, np.ndarray) and v.dtype == np.uint8)]
    lims = _limits(*points) if points else None
    for i, (label, panels) in enumerate(rows.items()):
        for j, (name, value) in enumerate(panels):
            ax = fig.add_subplot(len(rows), ncols, i * ncols + j + 1)
            if isinstance(value, np.ndarray) and value.dtype == np.uint8:
                ax.imshow(value[..., 0] if value.shape[-1] == 1 else value, cmap="gray", vmin=0, vmax=255)
            else:
                pts = _np(value)
                ax.scatter(pts[:, 0], pts[:, 1], **_SAMPLE_STYLE)
                ax.set_xlim(lims[0])
                ax.set_ylim(lims[1])
                ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(name, fontsize="small")
            if j == 0:
                ax.set_ylabel(label)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
