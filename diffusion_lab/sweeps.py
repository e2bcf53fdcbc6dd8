"""Sweep results: `python -m diffusion_lab.sweeps collect MULTIRUN_DIR [--metric nll]`.

Reads every job directory of a Hydra multirun (the ones holding .hydra/overrides.yaml), and writes
results.csv (every override, metric and the key protocol fields per job), results.md (a Markdown
table) and plots of the metric against each swept key (lines per sampler for steps, bars for
categorical keys such as the objective). Jobs without results.json are marked "failed" (error.txt
present, written by run_task when a job raises) or "unfinished"; they never stop the collector.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import yaml

from diffusion_lab import plots

PROTOCOL_FIELDS = ("sampler", "steps", "spacing", "eta", "churn", "nfe", "guidance", "guidance_scale", "step",
                   "sample_seed", "wall_seconds", "sampling_seconds")
DEFAULT_METRICS = ("nll", "fid", "kid_mean", "judge_accuracy", "accuracy", "test_mse_sigma_0.5")


def _job_dirs(root: Path) -> list[Path]:
    return sorted((p.parent.parent for p in root.rglob(".hydra/overrides.yaml")), key=_job_order)


def _job_order(path: Path):
    head = path.name.split("_", 1)[0]
    return (int(head), path.name) if head.isdigit() else (math.inf, path.name)


def _overrides(job: Path) -> dict[str, str]:
    items = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def collect_rows(root: Path) -> list[dict]:
    """One dict per job: job, status, overrides, flattened metrics and protocol fields."""
    rows = []
    for job in _job_dirs(root):
        row: dict = {"job": job.name, **{f"override:{k}": v for k, v in _overrides(job).items()}}
        results = job / "results.json"
        if results.is_file():
            try:
                res = json.loads(results.read_text())
                row["status"] = "ok"
                row |= {f"metric:{k}": v for k, v in res.get("metrics", {}).items() if isinstance(v, (int, float))}
                proto = res.get("protocol", {})
                row |= {f"protocol:{k}": proto[k] for k in PROTOCOL_FIELDS if k in proto}
                if isinstance(proto.get("objective"), dict):
                    row["protocol:objective"] = proto["objective"].get("name")
            except (json.JSONDecodeError, OSError) as exc:
                row["status"], row["error"] = "unreadable", f"{type(exc).__name__}: {exc}"
        elif (job / "error.txt").is_file():
            row["status"] = "failed"
            row["error"] = (job / "error.txt").read_text().strip().splitlines()[-1][:300]
        else:
            row["status"] = "unfinished"
        rows.append(row)
    return rows


def _swept(rows: list[dict]) -> list[str]:
    """Override keys whose value differs between jobs (the sweep axes)."""
    keys = sorted({k for r in rows for k in r if k.startswith("override:")})
    return [k for k in keys if len({r.get(k) for r in rows}) > 1]


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _pick_metric(rows: list[dict], metric: str | None) -> str | None:
    present = {k.removeprefix("metric:") for r in rows for k in r if k.startswith("metric:")}
    if metric:
        return metric if metric in present else None
    return next((m for m in DEFAULT_METRICS if m in present), None)


def write_table(rows: list[dict], metric: str | None, path: Path) -> None:
    axes = _swept(rows)
    extra = [f"metric:{metric}"] if metric else []
    extra += [k for k in ("metric:energy_distance", "metric:kid_std", "protocol:nfe", "protocol:wall_seconds")
              if any(k in r for r in rows) and k not in extra]
    cols = ["job", "status", *axes, *extra, "error"]
    lines = ["| " + " | ".join(c.split(":", 1)[-1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_plots(rows: list[dict], metric: str, out: Path) -> list[Path]:
    """Metric vs each swept key; numeric keys as lines (one per value of a categorical key), others as bars."""
    ok = [r for r in rows if r.get("status") == "ok" and f"metric:{metric}" in r]
    axes = _swept(rows)
    written = []
    is_numeric = {a: all(_number(r.get(a)) is not None for r in ok) for a in axes}
    for axis in axes:
        name = axis.removeprefix("override:")
        numeric = is_numeric[axis]
        if not numeric and any(is_numeric.values()):
            continue  # a categorical key (the sampler) becomes the line groups of the numeric plot instead
        groups = [a for a in axes if a != axis and not is_numeric[a]]
        group = groups[0] if groups else None
        series: dict[str, list[tuple]] = {}
        for r in ok:
            label = str(r.get(group, "")) if group else metric
            series.setdefault(label, []).append((r.get(axis), r[f"metric:{metric}"]))
        fig = plots.plot_metric_series(series, xlabel=name, ylabel=metric, numeric=numeric,
                                       title=f"{metric} vs {name}" + (f" per {group.split(':')[-1]}" if group else ""))
        path = out / f"plot_{metric}_vs_{name.replace('/', '_')}.png"
        plots.save_figure(fig, path)
        written.append(path)
    if len({r.get("protocol:nfe") for r in ok}) > 1:  # solver sweeps: quality per net evaluation
        written.append(_nfe_plot(ok, [a for a in axes if not is_numeric[a]], metric, out))
    return written


def _nfe_plot(ok: list[dict], categorical: list[str], metric: str, out: Path) -> Path:
    """Metric vs the protocol's exact NFE, one line per combination of the categorical swept keys."""
    series: dict[str, list[tuple]] = {}
    for r in ok:
        label = "/".join(str(r.get(a)) for a in categorical) or metric
        series.setdefault(label, []).append((r["protocol:nfe"], r[f"metric:{metric}"]))
    fig = plots.plot_metric_series(series, xlabel="NFE", ylabel=metric, title=f"{metric} vs NFE")
    path = out / f"plot_{metric}_vs_nfe.png"
    plots.save_figure(fig, path)
    return path


def collect(root: str | Path, metric: str | None = None) -> dict:
    """Write results.csv, results.md and plots into `root`; returns a summary."""
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"error: {root}: not a directory (expected a Hydra multirun dir)")
    rows = collect_rows(root)
    if not rows:
        raise SystemExit(f"error: {root}: no job directories (.hydra/overrides.yaml) found")
    metric = _pick_metric(rows, metric)
    cols = sorted({k for r in rows for k in r}, key=lambda c: (c not in ("job", "status"), c))
    with open(root / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    write_table(rows, metric, root / "results.md")
    figures = write_plots(rows, metric, root) if metric else []
    status = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "unfinished", "unreadable")}
    return {"jobs": len(rows), "status": status, "metric": metric, "csv": str(root / "results.csv"),
            "table": str(root / "results.md"), "plots": [str(p) for p in figures]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m diffusion_lab.sweeps")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="aggregate a multirun dir into results.csv / results.md / plots")
    c.add_argument("dir")
    c.add_argument("--metric", default=None, help="metric to tabulate and plot (default: the first of "
                                                  f"{', '.join(DEFAULT_METRICS)} present)")
    args = ap.parse_args(argv)
    summary = collect(args.dir, args.metric)
    print(json.dumps(summary, indent=2))
    print(Path(summary["table"]).read_text())


if __name__ == "__main__":
    main()
