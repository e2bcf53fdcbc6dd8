"""report.md for every training run: what a course report asks for, generated from the run itself."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from diffusion_lab.compute import trainer_scale
from diffusion_lab.fileio import atomic_write_text


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


def training_facts(trainer, net: torch.nn.Module, batch_size: int, train_seconds: float, run_dir: Path,
                   spent: dict | None = None) -> dict:
    """Model size, effective batch, iterations, epochs, wall time, device-hours, throughput, final loss and the
    compute spent (protocol["compute"]: FLOPs per forward, training and sampling FLOPs)."""
    devices, accumulate, accelerator = trainer_scale(trainer)
    hours = train_seconds * devices / 3600
    _, throughput = read_scalars(run_dir, "train/samples_per_sec")
    _, losses = read_scalars(run_dir, "train/loss")
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "parameters": count_parameters(net),
        "batch_size_per_device": batch_size,
        "effective_batch_size": batch_size * accumulate * devices,
        "iterations": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "train_wall_seconds": round(train_seconds, 2),
        "devices": f"{devices} x {accelerator}",
        ("gpu_hours" if accelerator == "cuda" else "device_hours"): round(hours, 4),
        "throughput_samples_per_sec_median": round(statistics.median(throughput), 1) if throughput else None,
        "final_loss_mean_last_10pct": round(statistics.fmean(tail), 6) if tail else None,
        "precision": str(trainer.precision),
        **_compute_facts(spent or {}),
    }


def _compute_facts(spent: dict) -> dict:
    """The report's compute rows (1 multiply-add = 1 FLOP, see compute.py)."""
    flops = {k: float(spent[k]) for k in ("train_flops", "sampling_flops") if k in spent}  # shown as 1.2e+09
    rows = {"forward_GFLOPs_per_sample": spent.get("forward_gflops"), "training_FLOPs": flops.get("train_flops"),
            "samples_seen": spent.get("samples_seen"), "sampling_FLOPs": flops.get("sampling_flops"),
            "sampling_NFE_x_CFG_factor": (f"{spent['nfe']} x {spent['cfg_factor']}" if "nfe" in spent else None),
            "FLOP_convention": spent.get("counter")}
    return {k: v for k, v in rows.items() if v is not None}


def write_report(run_dir: Path, title: str, facts: dict, results: dict, images: dict[str, str]) -> Path:
    """Write <run_dir>/report.md: training facts, figures (relative links), metrics and their protocol."""
    lines = [f"# {title}", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by diffusion-lab.", "",
             "Command: `python " + " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv)) + "`", "",
             "## Training", "", "| | |", "|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {_fmt(v)} |" for k, v in facts.items()]
    lines += ["", "## Figures", ""]
    for caption, name in images.items():
        if (run_dir / name).is_file():
            lines += [f"**{caption}** (`{name}`)", "", f"![{caption}]({name})", ""]
    lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in results.get("metrics", {}).items()]
    protocol = json.dumps(results.get("protocol", {}), indent=2, default=str)
    lines += ["", "## Protocol", "", "```json", protocol, "```", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
