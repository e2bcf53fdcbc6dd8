"""Render benchmark result files (benchmarks/results/*.json) as RESULTS.md, and the ratio summary."""

from __future__ import annotations

import json
from pathlib import Path

INTRO = """# Benchmark results

Written by `make bench` (`benchmarks/bench.py`); this file is re-rendered from `benchmarks/results/*.json`
(one file per device kind) on every run. Protocol:

- **Training** runs our real pipeline (`build()` + `build_trainer()`: EMA, throughput and LR callbacks,
  TensorBoard logging every 50 steps, the run's precision) against diffusers' documented training step
  (`train_unconditional.py`: `DDPMScheduler.add_noise`, AdamW, grad clipping, `EMAModel(foreach=True)`)
  with a `UNet2DModel` of the same architecture and parameter count. Both read the same resident uint8
  batches. Steps after a warm-up are timed. On CUDA the device is synchronised only at the two ends
  (rate = images / elapsed); on the CPU, where every op is synchronous, the rate is the batch over the
  median step time, which a single stall of the shared machine cannot swing.
- **Sampling** is DDIM (eta 0): `DiffusionModule.sample` against `DDIMScheduler.set_timesteps/step`,
  both memory formats; the ratio takes each side's faster one. Loop overhead per step is timed with a
  zero-cost net on both sides.
- **MFU** = model FLOPs (torch.utils.flop_counter: matmuls, convolutions, attention) per image x img/s,
  over this device's *measured* dense-matmul peak at the run's precision.
- **End to end (MNIST)**: `experiment=mnist_ddpm` (simple_unet, real MNIST, resident uint8, bf16 +
  channels_last as configured) against a plain loop: torchvision `MNIST` + `ToTensor`, a shuffling
  `DataLoader`, the same model, batch and precision.
- **STATES time to quality**: a fresh `python run.py experiment=...` process, from launch to its
  results.json (NLL of 5000 samples under the KDE of the true points, the CSE849 protocol).
"""


def _best(rows, **match):
    rows = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return max(rows, key=lambda r: r["img_per_s"]) if rows else None


def _ratio(a, b) -> str:
    return f"{a['img_per_s'] / b['img_per_s']:.2f}x" if a and b and b["img_per_s"] else "n/a"


def ratios(result: dict) -> list[str]:
    """One line per comparison: ours / theirs (> 1: we are faster)."""
    lines = []
    train = result.get("train") or []
    for preset in dict.fromkeys(r["preset"] for r in train):
        o, d = _best(train, side="ours", preset=preset), _best(train, side="diffusers", preset=preset)
        lines.append(f"train {preset}: best vs best {_ratio(o, d)} (ours {o['img_per_s']} img/s at {o['precision']}"
                     f"{' +CL' if o['channels_last'] else ''}, MFU {o['mfu']:.1%}; diffusers {d['img_per_s']} at "
                     f"{d['precision']}{' +CL' if d['channels_last'] else ''}, MFU {d['mfu']:.1%})")
        for p in dict.fromkeys(r["precision"] for r in train):
            o, d = (_best(train, side=side, preset=preset, precision=p) for side in ("ours", "diffusers"))
            lines.append(f"train {preset} @ {p} (each its best memory format): {_ratio(o, d)}")
    sample = [r for r in result.get("sample") or [] if r["side"] in ("ours", "diffusers")]
    for preset in dict.fromkeys(r["preset"] for r in sample):
        for p in dict.fromkeys(r["precision"] for r in sample):
            o = _best(sample, side="ours", preset=preset, precision=p)
            d = _best(sample, side="diffusers", preset=preset, precision=p)
            if o and d:
                cl = lambda r: " +CL" if r["channels_last"] else ""
                lines.append(f"sample {preset} DDIM-{o['steps']} x{o['n']} @ {p}, best memory format each: "
                             f"{_ratio(o, d)} (ours {o['img_per_s']} img/s{cl(o)}, MFU {o['mfu']:.1%}; "
                             f"diffusers {d['img_per_s']}{cl(d)})")
    for r in result.get("sample") or []:
        if r["side"] == "overhead":
            less = r["us_per_step_diffusers"] / r["us_per_step_ours"]
            lines.append(f"sampling loop overhead per step: ours {r['us_per_step_ours']} us, diffusers "
                         f"{r['us_per_step_diffusers']} us ({less:.1f}x less)")
    solver = result.get("solver") or []
    for r in solver:
        if r["side"] == "overhead":
            lines.append(f"DPM-Solver++(2M) loop overhead per step: ours {r['us_per_step_ours']} us, diffusers "
                         f"{r['us_per_step_diffusers']} us")
    for nfe in dict.fromkeys(r["nfe"] for r in solver if "nfe" in r):
        o = _best([r for r in solver if r.get("nfe") == nfe], side="ours")
        d = _best([r for r in solver if r.get("nfe") == nfe], side="diffusers")
        lines.append(f"DPM-Solver++(2M) {nfe} NFE x{o['n']} on the same net: {_ratio(o, d)} (ours {o['img_per_s']} "
                     f"img/s, diffusers {d['img_per_s']}; outputs differ by <= {o['max_abs_diff']})")
    e2e = [r for r in result.get("e2e") or [] if "skipped" not in r]
    for p in dict.fromkeys(r["precision"] for r in e2e):
        o = _best(e2e, side="ours", precision=p)
        plain = max((r for r in e2e if r["precision"] == p and r["side"] != "ours"), key=lambda r: r["img_per_s"])
        lines.append(f"MNIST simple_unet end to end @ {p}: {_ratio(o, plain)} vs the best plain DataLoader loop "
                     f"(ours {o['img_per_s']} img/s, plain {plain['img_per_s']} with {plain['side']})")
    for r in result.get("states") or []:
        if "error" not in r:
            lines.append(f"STATES {r['experiment']}: NLL {r['nll']} ({r['n_samples']} samples) {r['wall_s']} s "
                         f"from launch (train {r['train_s']} s, sampling {r['sampling_s']} s, {r['steps']} steps)")
    ev = result.get("eval") or {}
    if ev and "skipped" not in ev:
        lines.append(f"eval: Inception {ev['inception_img_per_s']} img/s; FID+KID on {ev['n']} vs {ev['n']}: "
                     f"{ev['fid_kid_cold_s']} s cold, {ev['fid_kid_warm_s']} s with the reference cache")
    return lines


def summary(result: dict) -> str:
    m = result["machine"]
    return "\n".join([f"\n== ours / diffusers and baselines on {m['device']} ({m['date']})", *ratios(result)])


def _table(rows: list[dict], cols: list[str]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            if c == "mfu" and isinstance(v, float):
                v = f"{v:.1%}"
            elif c == "params" and isinstance(v, int):
                v = f"{v:,}"
            cells.append(str(v))
        out.append("| " + " | ".join(cells) + " |")
    return out


def render_one(result: dict) -> str:
    m = result["machine"]
    lines = [f"## {m['device']} — {m['date']}", "",
             f"torch {m['torch']}, lightning {m['lightning']}, diffusers {m['diffusers']}, python {m['python']}, "
             f"{m['cpu_threads']} CPU threads ({m['cpu']}); `make bench` took {result.get('bench_seconds')} s"
             f"{' (--quick)' if result.get('quick') else ''}.", ""]
    if result.get("peak_flops"):
        peaks = ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in result["peak_flops"].items())
        lines += [f"Measured dense-matmul peak: {peaks}.", ""]
    lines += ["**Ratios** (ours / theirs; > 1 means we are faster):", ""]
    lines += [f"- {line}" for line in ratios(result)] + [""]
    if result.get("train"):
        lines += ["### Training step", ""]
        lines += _table(result["train"], ["side", "preset", "params", "batch", "precision", "channels_last",
                                          "img_per_s", "gflop_per_img", "mfu"]) + [""]
    if result.get("sample"):
        lines += ["### Sampling (DDIM)", ""]
        lines += _table([r for r in result["sample"] if r["side"] != "overhead"],
                        ["side", "preset", "n", "steps", "precision", "channels_last", "seconds", "img_per_s",
                         "mfu"]) + [""]
    if result.get("solver"):
        lines += ["### Sampling (DPM-Solver++(2M) vs DPMSolverMultistepScheduler)", ""]
        lines += _table([r for r in result["solver"] if r["side"] != "overhead"],
                        ["side", "preset", "n", "nfe", "seconds", "img_per_s", "max_abs_diff"]) + [""]
    if result.get("e2e"):
        lines += ["### MNIST simple_unet end to end", ""]
        lines += _table(result["e2e"], ["side", "precision", "channels_last", "batch", "img_per_s", "params"]) + [""]
    if result.get("states"):
        lines += ["### STATES time to quality", ""]
        lines += _table(result["states"], ["experiment", "wall_s", "train_s", "sampling_s", "steps", "sampler",
                                           "nll", "n_samples"]) + [""]
    if result.get("eval"):
        lines += ["### Evaluation", "", "```json", json.dumps(result["eval"], indent=1), "```", ""]
    return "\n".join(lines)


def render(results_dir: Path) -> str:
    files = sorted(Path(results_dir).glob("*.json"))
    parts = [INTRO]
    for f in files:
        parts.append(render_one(json.loads(f.read_text())))
    if not any(f.stem == "cuda" for f in files):
        parts.append("## GPU\n\nNo GPU result yet: run `make bench` on a CUDA machine (it writes "
                     "`results/cuda.json` and adds its section here).\n")
    return "\n".join(parts)
