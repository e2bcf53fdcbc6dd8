"""Sweep results: `python -m diffusion_lab.sweeps collect MULTIRUN_DIR [--metric nll] [--x train_flops]`.

Reads every job directory of a Hydra multirun (the ones holding .hydra/overrides.yaml), and writes
results.csv (every override, metric and the key protocol fields per job, with the compute each job spent:
parameters, GFLOPs per forward, training and sampling FLOPs, device-hours; the backbone and space),
results.md (a Markdown table, with the checkpoint each job wrote or read, and a second table of mean ± std
over seeds when seeds were swept) and plots of the metric against each swept key (lines per sampler for
steps, log x over a decade or more; bars in the sweep's order for categorical keys such as the objective;
means with std error bars over seeds), against NFE and against training FLOPs (log x) when those differ
between jobs, and against any column asked for with --x; with the sampling steps swept, samples_vs_steps.png
(one sample per setting side by side, CMU 10-799 HW1 Q7). Jobs without results.json are marked "failed"
(error.txt present, written by run_task when a job raises) or "unfinished"; they never stop the collector.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import torch
import yaml

from diffusion_lab import plots
from diffusion_lab.spaces import space_name

PROTOCOL_FIELDS = ("checkpoint", "sampler", "steps", "spacing", "eta", "churn", "nfe", "guidance", "guidance_scale",
                   "step", "sample_seed", "wall_seconds", "sampling_seconds")
# overrides that only repeat a run (sweep=seeds): rows differing in these alone are one setting, summarised
# as mean ± std over its seeds
SEED_KEYS = ("override:seed", "override:eval.seed", "override:data.seed")
DEFAULT_METRICS = ("nll", "fid", "kid_mean", "judge_accuracy", "accuracy", "test_mse_sigma_0.5")
# protocol["compute"] (compute.py; 1 multiply-add = 1 FLOP) -> compute:<field> columns
COMPUTE_FIELDS = ("parameters", "forward_gflops", "samples_seen", "train_flops", "sampling_flops", "cfg_factor",
                  "decode_gflops", "device_hours", "gpu_hours")
# results.md: the columns that say what a job was and what it cost, when any job has them
TABLE_EXTRA = ("protocol:checkpoint", "protocol:step", "protocol:backbone", "protocol:space", "protocol:guidance",
               "protocol:nfe", "compute:parameters",
               "compute:forward_gflops", "compute:train_flops", "compute:sampling_flops", "compute:gpu_hours",
               "compute:device_hours", "protocol:wall_seconds")


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
                if "protocol:checkpoint" in row:  # a job's own checkpoint as <job>/checkpoints/..., short and movable
                    row["protocol:checkpoint"] = _relative(Path(str(row["protocol:checkpoint"])), root)
                if isinstance(proto.get("objective"), dict):
                    row["protocol:objective"] = proto["objective"].get("name")
                if isinstance(proto.get("space"), dict):  # "pixels", "autoencoder", "diffusers_vae", "points"
                    row["protocol:space"] = space_name(str(proto["space"].get("space")))
                if proto.get("backbone"):
                    row["protocol:backbone"] = proto["backbone"]
                spent = proto.get("compute") or {}
                row |= {f"compute:{k}": spent[k] for k in COMPUTE_FIELDS if spent.get(k) is not None}
            except (json.JSONDecodeError, OSError) as exc:
                row["status"], row["error"] = "unreadable", f"{type(exc).__name__}: {exc}"
        elif (job / "error.txt").is_file():
            row["status"] = "failed"
            row["error"] = (job / "error.txt").read_text().strip().splitlines()[-1][:300]
        else:
            row["status"] = "unfinished"
        rows.append(row)
    return rows


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _swept(rows: list[dict]) -> list[str]:
    """Override keys whose value differs between jobs (the sweep axes)."""
    keys = sorted({k for r in rows for k in r if k.startswith("override:")})
    return [k for k in keys if len({r.get(k) for r in rows}) > 1]


def _is_path(value) -> bool:
    return isinstance(value, str) and ("/" in value or value.endswith((".ckpt", ".pt", ".npz", ".pth")))


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


def _cell(column: str, value) -> str:
    if column.endswith("_flops") and isinstance(value, (int, float)):
        return f"{value:.3e}"  # 1.234e+15: FLOPs span too many decades for fixed decimals
    if column.endswith(("_gflops", "_hours")) and isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:.4f}" if isinstance(value, float) else str(value).replace("|", "\\|")


def write_table(rows: list[dict], metric: str | None, path: Path) -> None:
    axes = _swept(rows)
    extra = [f"metric:{metric}"] if metric else []
    extra += [k for k in ("metric:energy_distance", "metric:kid_std", *TABLE_EXTRA)
              if any(k in r for r in rows) and k not in extra]
    cols = ["job", "status", *axes, *extra, "error"]
    lines = ["| " + " | ".join(c.split(":", 1)[-1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(c, r.get(c, "")) for c in cols) + " |")
    path.write_text("\n".join(lines) + "\n")


def seed_summary(rows: list[dict], metric: str) -> tuple[list[str], list[dict]]:
    """Finished jobs that differ only by seed (SEED_KEYS) as one row per setting -> (the setting's swept keys,
    rows with those keys, `seeds` (n), the metric's mean and sample std (ddof=1; NaN for one seed) as
    metric:<m> and metric:<m>_std, and the columns all its jobs share (NFE, FLOPs, checkpoint step, ...))."""
    axes = _swept(rows)
    keys = [a for a in axes if a not in SEED_KEYS]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") == "ok" and f"metric:{metric}" in r:
            groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    out = []
    for members in groups.values():
        values = [float(m[f"metric:{metric}"]) for m in members]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
        shared = {k: v for k, v in members[0].items() if all(m.get(k) == v for m in members)}
        out.append({**shared, "job": ",".join(m["job"].split("_", 1)[0] for m in members), "status": "ok",
                    "seeds": len(members), f"metric:{metric}": mean, f"metric:{metric}_std": std})
    return keys, out


def write_seed_table(keys: list[str], summary: list[dict], metric: str, path: Path) -> None:
    """Markdown: one row per setting, the metric as mean ± std over its seeds."""
    cols = [k.split(":", 1)[-1] for k in keys]
    lines = ["", f"## {metric}: mean ± std over seeds (sample std, n = seeds)", "",
             "| " + " | ".join([*cols, "seeds", metric, "jobs"]) + " |", "|" + "---|" * (len(cols) + 3)]
    for r in summary:
        mean, std = r[f"metric:{metric}"], r[f"metric:{metric}_std"]
        cell = f"{mean:.4f} ± {std:.4f}" if not math.isnan(std) else f"{mean:.4f} (one seed)"
        lines.append("| " + " | ".join([*(_cell(k, r.get(k, "")) for k in keys), str(r["seeds"]), cell,
                                          r["job"]]) + " |")
    with open(path, "a") as fh:
        fh.write("\n".join(lines) + "\n")


def _logx(xs: list[float], always: bool = False) -> bool:
    """Log x when the values are positive and span a decade or more (steps 10..1000, NFE 5..50); `always`
    for quantities read on a log scale anyway (NFE, FLOPs, hours)."""
    return bool(xs) and min(xs) > 0 and (always or max(xs) / min(xs) >= 10)


def write_plots(rows: list[dict], metric: str, out: Path, extra_x: tuple[str, ...] = ()) -> list[Path]:
    """Metric vs each swept key (numeric keys as lines, one per value of a categorical key, others as bars),
    vs NFE and training FLOPs when they differ between jobs, and vs the columns in `extra_x`. With seeds
    swept, each point is the mean over the seeds of its setting with the std as an error bar."""
    # file paths (space.ckpt, eval.judge, ...) stay in the table but make no plot axis or legend: they name
    # inputs, and where they differ the experiment (or another swept key) already tells the jobs apart
    axes = [a for a in _swept(rows) if not any(_is_path(r.get(a)) for r in rows)]
    if any(a in SEED_KEYS for a in axes):
        keys, ok = seed_summary(rows, metric)
        axes = [a for a in keys if a in axes]
    else:
        ok = [r for r in rows if r.get("status") == "ok" and f"metric:{metric}" in r]
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
            series.setdefault(label, []).append(_point(r.get(axis), r, metric))
        xs = [_number(r.get(axis)) for r in ok] if numeric else []
        fig = plots.plot_metric_series(series, xlabel=name, ylabel=metric, numeric=numeric, logx=_logx(xs),
                                       title=f"{metric} vs {name}" + (f" per {group.split(':')[-1]}" if group else ""))
        path = out / f"plot_{metric}_vs_{name.replace('/', '_')}.png"
        plots.save_figure(fig, path)
        written.append(path)
    categorical = [a for a in axes if not is_numeric[a]]
    for column in dict.fromkeys(("protocol:nfe", "compute:train_flops", *extra_x)):
        # solver sweeps: quality per net evaluation; backbones / spaces: quality at equal training compute
        values = {r.get(column) for r in ok}
        if column in extra_x or (len(values) > 1 and None not in values):
            groups = categorical
            if column.endswith("_flops") and len({r.get("compute:parameters") for r in ok}) > 1:
                groups = [*categorical, "compute:parameters"]  # one curve per model size (scaling plots)
            written.append(_column_plot(ok, column, groups, metric, out))
    return written


def _point(x, row: dict, metric: str) -> tuple:
    """(x, y) or (x, mean, std) when the row summarises several seeds."""
    std = row.get(f"metric:{metric}_std")
    return (x, row[f"metric:{metric}"]) if std is None or math.isnan(std) else (x, row[f"metric:{metric}"], std)


def _fail(message: str):
    """Bad input: one line on stderr, exit code 2, before anything is written."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def column_key(rows: list[dict], name: str) -> str:
    """A --x name as a column: exact, else compute:/protocol:/override:/metric: + name."""
    present = {k for r in rows for k in r}
    for key in (name, f"compute:{name}", f"protocol:{name}", f"override:{name}", f"metric:{name}"):
        if key in present:
            return key
    numeric = sorted(k for k in present if any(_number(r.get(k)) is not None for r in rows) and k != "job")
    _fail(f"--x {name}: no such column; numeric columns: {', '.join(numeric)}")


def _column_plot(ok: list[dict], column: str, groups: list[str], metric: str, out: Path) -> Path:
    """Metric vs a numeric column (NFE, training FLOPs, ...), one line per combination of the `groups` columns
    (the categorical swept keys: objective, experiment, ...); log x for FLOPs and hours (compute spans decades)
    and for any column whose values span more than two."""
    series: dict[str, list[tuple]] = {}
    for r in ok:
        x = _number(r.get(column))
        if x is not None:
            label = "/".join(f"{r.get(a) / 1e6:.3g}M params" if a == "compute:parameters" else str(r.get(a))
                             for a in groups) or metric
            series.setdefault(label, []).append(_point(x, r, metric))
    xs = [p[0] for pts in series.values() for p in pts]
    logx = _logx(xs, always=column.endswith(("_flops", "_hours", "nfe")))
    name = column.split(":", 1)[-1]
    label = {"nfe": "NFE", "train_flops": "training FLOPs (1 multiply-add = 1 FLOP)"}.get(name, name)
    fig = plots.plot_metric_series(series, xlabel=label, ylabel=metric, title=f"{metric} vs {label.split(' (')[0]}",
                                   logx=logx)
    path = out / f"plot_{metric}_vs_{name.replace('/', '_')}.png"
    plots.save_figure(fig, path)
    return path


def write_samples_vs_steps(rows: list[dict], root: Path) -> Path | None:
    """samples_vs_steps.png: when the number of sampling steps differs between finished jobs, the first sample
    of each (sampler, steps) setting side by side, a row per sampler, steps ascending (CMU 10-799 HW1 Q7:
    "include 1 sample for each number of steps"); every job starts from its seed's noise, so the panels differ
    only by the solver. 2D points: the job's samples as one scatter per panel."""
    ok = [r for r in rows if r.get("status") == "ok" and _number(r.get("protocol:steps")) is not None]
    if len({r["protocol:steps"] for r in ok}) < 2:
        return None
    from diffusion_lab.imageio import to_uint8

    paths = {job.name: job for job in _job_dirs(root)}
    picked: dict[str, dict[int, dict]] = {}  # sampler (sweep order) -> steps -> its first job
    for r in ok:
        picked.setdefault(str(r.get("protocol:sampler", "")), {}).setdefault(int(r["protocol:steps"]), r)
    table: dict[str, list] = {}
    for sampler, by_steps in picked.items():
        for steps, r in sorted(by_steps.items()):
            path = paths[r["job"]] / "samples.pt"
            if not path.is_file():
                continue
            samples = torch.load(path, map_location="cpu", weights_only=True)["samples"]
            if samples.ndim == 4:  # images in [-1, 1]: the first one
                value = to_uint8(samples[:1])[0].permute(1, 2, 0).numpy()
            elif samples.ndim == 2 and samples.shape[1] == 2:  # 2D points: one sample is no picture, the set is
                value = samples[:2000].numpy()
            else:
                continue
            nfe = _number(r.get("protocol:nfe"))
            name = f"{steps} steps" + (f"\nNFE {nfe:.0f}" if nfe is not None and nfe != steps else "")
            table.setdefault(sampler, []).append((name, value))
    if not table:
        return None
    out = root / "samples_vs_steps.png"
    plots.save_figure(plots.plot_sample_table(table, title="one sample per number of sampling steps"), out)
    return out


def collect(root: str | Path, metric: str | None = None, x: list[str] | tuple[str, ...] = ()) -> dict:
    """Write results.csv, results.md and plots into `root` (also vs each column named in `x`, e.g.
    "train_flops"); returns a summary."""
    root = Path(root)
    if not root.is_dir():
        _fail(f"{root}: not a directory (expected a Hydra multirun dir)")
    rows = collect_rows(root)
    if not rows:
        _fail(f"{root}: no job directories (.hydra/overrides.yaml) found")
    metric = _pick_metric(rows, metric)
    extra_x = tuple(column_key(rows, name) for name in x)
    cols = sorted({k for r in rows for k in r}, key=lambda c: (c not in ("job", "status"), c))
    with open(root / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    write_table(rows, metric, root / "results.md")
    if metric and any(a in SEED_KEYS for a in _swept(rows)):
        write_seed_table(*seed_summary(rows, metric), metric, root / "results.md")
    strip = write_samples_vs_steps(rows, root)
    figures = ([strip] if strip else []) + (write_plots(rows, metric, root, extra_x) if metric else [])
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
    c.add_argument("--x", action="append", default=[], metavar="COLUMN",
                   help="also plot the metric against this column (e.g. train_flops, sampling_flops, gpu_hours, "
                        "forward_gflops; repeatable); training FLOPs are plotted anyway when they differ")
    args = ap.parse_args(argv)
    summary = collect(args.dir, args.metric, args.x)
    print(json.dumps(summary, indent=2))
    print(Path(summary["table"]).read_text())


if __name__ == "__main__":
    main()
