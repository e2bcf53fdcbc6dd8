"""report.md for every run (train, sample, evaluate, classifier, autoencoder): what a course report asks for,
generated from the run itself and from nothing that depends on which logger ran."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from diffusion_lab.compute import trainer_scale
from diffusion_lab.fileio import atomic_write_text

# Figures a run may write, in report order, with their captions; any other PNG/GIF in the run dir or in
# monitor/ is linked too (by file name), so every figure the run wrote is reachable from the report.
FIGURES = {"loss_curve.png": "Loss curve", "samples.png": "Samples", "samples_per_class.png": "Samples per class",
           "trajectory.png": "Denoising trajectory", "sampling.gif": "Sampling (animation)"}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def read_scalars(run_dir: Path, tag: str) -> tuple[list, list]:
    """(steps, values) of a scalar logged to TensorBoard, read back from the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps, values = [], []
    for path in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            for ev in acc.Scalars(tag):
                steps.append(ev.step)
                values.append(ev.value)
    return steps, values


def history(trainer):
    """The fit's callbacks.History (loss and throughput per logging step over every launch), or None."""
    from diffusion_lab.callbacks import History

    return next((c for c in trainer.callbacks if isinstance(c, History)), None)


def _train_items(trainer) -> int | None:
    """Items in the training set (an epoch's worth of samples), from the datamodule's own description."""
    describe = getattr(trainer.datamodule, "describe", None)
    try:
        info = describe() if describe is not None else {}
    except Exception:  # a datamodule that cannot describe itself: no fractional epoch, not a failed report
        return None
    n = info.get("train_n", info.get("n"))
    return int(n) if isinstance(n, int) and n > 0 else None


def training_facts(trainer, net: torch.nn.Module, batch_size: int, train_seconds: float, run_dir: Path,
                   spent: dict | None = None) -> dict:
    """Model size, effective batch, iterations, epochs (samples seen / training items: 4 steps of a 15,000-step
    epoch are 0.0003 epochs), wall time and device-hours over every launch of a resumed run (the ledger in the
    checkpoint, compute.TrainingLedger), throughput, final loss and the compute spent."""
    devices, accumulate, accelerator = trainer_scale(trainer)
    spent = spent or {}
    seconds = float(spent.get("train_loop_seconds", train_seconds))
    record = history(trainer)
    throughput = record.samples_per_sec if record else []
    losses = record.loss if record else []
    tail = losses[-max(1, len(losses) // 10):]
    effective = batch_size * accumulate * devices
    seen = int(spent.get("samples_seen", trainer.global_step * effective))
    items = _train_items(trainer)
    return {
        "parameters": count_parameters(net),
        "batch_size_per_device": batch_size,
        "effective_batch_size": effective,
        "iterations": int(trainer.global_step),
        "samples_seen": seen,
        "epochs": round(seen / items, 4) if items else None,
        "training_items": items,
        "train_loop_seconds_all_launches": round(seconds, 2),
        "fit_wall_seconds_this_launch": round(train_seconds, 2),
        "devices": f"{devices} x {accelerator}",
        ("gpu_hours" if accelerator == "cuda" else "device_hours"): round(seconds * devices / 3600, 4),
        "throughput_samples_per_sec_median": round(statistics.median(throughput), 1) if throughput else None,
        "final_loss_mean_last_10pct": round(statistics.fmean(tail), 6) if tail else None,
        "precision": str(trainer.precision),
        **_compute_facts(spent),
    }


def sampling_facts(protocol: dict) -> dict:
    """The report rows of a task=sample/evaluate run: what was loaded and how it was sampled."""
    keys = ("checkpoint", "step", "ema", "sampler", "steps", "eta", "nfe", "guidance", "guidance_scale", "classes",
            "n_samples", "sample_seed", "sample_precision", "sampling_seconds", "wall_seconds", "device", "samples")
    spent = protocol.get("compute", {})
    rows = {k: protocol[k] for k in keys if protocol.get(k) is not None}
    if "train_loop_seconds" in spent:
        rows["checkpoint_training_seconds"] = spent["train_loop_seconds"]
    return rows | _compute_facts(spent)


def _compute_facts(spent: dict) -> dict:
    """The report's compute rows (1 multiply-add = 1 FLOP, see compute.py)."""
    flops = {k: float(spent[k]) for k in ("train_flops", "sampling_flops") if k in spent}  # shown as 1.2e+09
    rows = {"forward_GFLOPs_per_sample": spent.get("forward_gflops"), "training_FLOPs": flops.get("train_flops"),
            "sampling_FLOPs": flops.get("sampling_flops"),
            "sampling_NFE_x_CFG_factor": (f"{spent['nfe']} x {spent['cfg_factor']}" if "nfe" in spent else None),
            "FLOP_convention": spent.get("counter")}
    return {k: v for k, v in rows.items() if v is not None}


def _name(node) -> str | None:
    """`diffusion_lab.samplers.sample_ddim` -> `ddim`, `torch.optim.AdamW` -> `AdamW`."""
    target = node.get("_target_") if isinstance(node, dict) else None
    return target.rsplit(".", 1)[-1].removeprefix("sample_") if isinstance(target, str) else None


def hyperparameters(config: dict) -> dict:
    """The settings a course report tabulates, from a resolved run config (config.yaml)."""
    get = lambda *path: _get(config, path)  # noqa: E731
    task = _name(get("task"))
    net = {"train_classifier": "classifier", "train_autoencoder": "autoencoder"}.get(task, "model")
    rows = {
        "task": task, "data": get("data", "name") or _name(get("data")), net: _name(get(net)),
        "objective": _name(get("objective")), "schedule": _name(get("schedule")),
        "T (timesteps)": get("schedule", "T") or get("timesteps"),
        "optimizer": _name(get("optimizer")), "lr": get("optimizer", "lr"),
        "weight_decay": get("optimizer", "weight_decay"), "betas": get("optimizer", "betas"),
        "lr_scheduler": _name(get("lr_scheduler")), "warmup_steps": get("lr_scheduler", "warmup_steps"),
        "batch_size": get("data", "batch_size"), "max_steps": get("trainer", "max_steps"),
        "max_epochs": get("trainer", "max_epochs"), "precision": get("trainer", "precision"),
        "gradient_clip_val": get("trainer", "gradient_clip_val"),
        "EMA decay": get("callbacks", "ema", "decay"),
        "sampler": _name(get("sampler")), "sampler steps": get("sampler", "steps"), "eta": get("sampler", "eta"),
        "guidance": _name(get("guidance")), "guidance scale": get("guidance", "scale"),
        "label dropout (CFG)": get("objective", "label_dropout"),
        "eval n_samples": get("eval", "n_samples"), "seed": get("seed"),
    }
    return {k: v for k, v in rows.items() if v is not None and v != -1}  # -1: no limit (max_steps, max_epochs)


def _get(node, path):
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def software() -> dict:
    """Library versions and the git commit of the code that ran (no machine paths)."""
    import hydra
    import lightning

    import diffusion_lab

    rows = {"python": sys.version.split()[0], "torch": torch.__version__, "lightning": lightning.__version__,
            "hydra": hydra.__version__, "diffusion_lab": diffusion_lab.__version__}
    commit = git_commit(Path(diffusion_lab.__file__).parent)
    if commit:
        rows["git commit"] = commit
    return rows


def git_commit(where: Path) -> str | None:
    """HEAD of the git checkout holding `where` (+ "-dirty" with uncommitted changes to tracked files); None
    outside a checkout (an installed package) or without git. The package's own files must be tracked there:
    a venv inside some other project's repo would otherwise report that project's commit."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10)

    try:
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return None
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _figures(run_dir: Path, images: dict[str, str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(embedded (caption, file) pairs, further figure files to link), every one existing in the run dir."""
    shown = [(caption, name) for caption, name in images.items() if (run_dir / name).is_file()]
    shown += [(caption, name) for name, caption in FIGURES.items()
              if (run_dir / name).is_file() and name not in {n for _, n in shown}]
    known = {name for _, name in shown}
    others = sorted(p.name for p in run_dir.glob("*") if p.suffix in (".png", ".gif") and p.name not in known)
    monitor = sorted(f"monitor/{p.name}" for p in (run_dir / "monitor").glob("*.png")) if (
        run_dir / "monitor").is_dir() else []
    return shown, others + monitor


def _metric_rows(results: dict) -> list[str]:
    protocol = results.get("protocol", {})
    rows = []
    for key, value in results.get("metrics", {}).items():
        note = ""
        if key == "kid_std" and protocol.get("kid_std_note"):
            note = f" ({protocol['kid_std_note']})"
        rows.append(f"| {key} | {value:.6g}{note} |" if isinstance(value, float) else f"| {key} | {value}{note} |")
    return rows


def write_report(run_dir: Path, title: str, facts: dict, results: dict, images: dict[str, str],
                 config: dict | None = None, section: str = "Training", params_title: str = "Hyperparameters") -> Path:
    """Write <run_dir>/report.md: facts, hyperparameters, software, figures (relative links), metrics and their
    protocol. `config`: the resolved config to tabulate (default: the run dir's config.yaml)."""
    if config is None and (run_dir / "config.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    lines = [f"# {title}", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by diffusion-lab.", "",
             "Command: `python " + " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv)) + "`", "",
             f"## {section}", "", "| | |", "|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {_fmt(v)} |" for k, v in facts.items() if v is not None]
    params = hyperparameters(config or {})
    if params:
        lines += ["", f"## {params_title}", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in params.items()]
    lines += ["", "## Software", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in software().items()]
    shown, others = _figures(run_dir, images)
    lines += ["", "## Figures", ""]
    for caption, name in shown:
        lines += [f"**{caption}** (`{name}`)", "", f"![{caption}]({name})", ""]
    if others:
        lines += ["Also written: " + ", ".join(f"[{name}]({name})" for name in others), ""]
    lines += ["## Metrics", "", "| metric | value |", "|---|---|", *_metric_rows(results)]
    protocol = json.dumps(results.get("protocol", {}), indent=2, default=str)
    lines += ["", "## Protocol", "", "```json", protocol, "```", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
