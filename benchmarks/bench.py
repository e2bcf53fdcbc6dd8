"""Performance benchmark: ours vs diffusers (training step, sampling loop), MFU, evaluation throughput,
MNIST end to end vs a plain DataLoader loop, and STATES time to quality.

    make bench                        # everything, on CUDA if present else the CPU (~8 min on 2 cores)
    python benchmarks/bench.py --sections train,sample --quick

Every section runs both sides in the same process, on the same device, on the same bytes. Results go
to benchmarks/results/<cpu|cuda>.json, and benchmarks/RESULTS.md is re-rendered from all result files
(machine, versions and date in each section's header).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import baselines  # noqa: E402
import harness  # noqa: E402
import ours  # noqa: E402
import report  # noqa: E402
from baselines import T_TRAIN  # noqa: E402

SECTIONS = ("peak", "train", "sample", "solver", "eval", "e2e", "states")
# Equal-size pairs: our preset -> (experiment it runs in, image shape, hflip, batch CPU, batch CUDA, overrides).
# unet_cifar is Ho et al.'s CIFAR-10 model (35.75M params on both sides); unet_tiny is a small DDPM UNet
# on MNIST-shaped data (mnist_ddpm's simple_unet `hidden` key does not apply to it).
PAIRS = {
    "unet_cifar": ("cifar10_ddpm", (3, 32, 32), True, 8, 128, []),
    "unet_tiny": ("mnist_ddpm", (1, 28, 28), False, 64, 512, ["~model.hidden"]),
}
PRECISIONS = {"cpu": ("32-true", "bf16-mixed"), "cuda": ("32-true", "bf16-mixed")}


def synthetic_u8(shape, n: int = 2048) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _ours_forward(shape):
    """forward(net, batch) for FLOP counting: our nets take t in [0, 1]."""
    return lambda net, b: net(torch.randn(b, *shape), torch.rand(b))


def _diffusers_forward(shape):
    """UNet2DModel takes integer timesteps and returns an output object."""
    return lambda net, b: net(torch.randn(b, *shape), torch.randint(0, T_TRAIN, (b,))).sample


def section_peak(device: str, quick: bool) -> dict:
    dtypes = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16}
    if device == "cuda":
        dtypes["16-mixed"] = torch.float16
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 peak is true fp32, like our fp32 runs
    return {p: harness.matmul_peak(device, dt, seconds=0.5 if quick else 2.0) for p, dt in dtypes.items()}


def section_train(device: str, quick: bool, peaks: dict) -> list[dict]:
    rows = []
    for preset, (experiment, shape, hflip, cpu_batch, gpu_batch, extra) in PAIRS.items():
        batch = gpu_batch if device == "cuda" else cpu_batch
        steps, warmup = (40, 10) if device == "cuda" else ({"unet_cifar": 6, "unet_tiny": 15}[preset], 2)
        steps = max(2, steps // 3) if quick else steps
        u8 = synthetic_u8(shape)
        flops = {}
        for precision in PRECISIONS[device]:
            for cl in (False, True):
                cfg = ours.bench_cfg(experiment, precision, cl, warmup + steps,
                                     [f"model={preset}", f"data.batch_size={batch}", "data.download=false", *extra])
                rate, module = ours.train(cfg, device, warmup, ours.ResidentData(u8, batch, hflip))
                if "ours" not in flops:
                    flops["ours"] = harness.training_flops_per_image(
                        module.net, _ours_forward(shape))
                    mcfg = ours.model_cfg(cfg)
                rows.append(_train_row("ours", preset, harness.params(module.net), batch, precision, cl, rate,
                                       flops["ours"], peaks))
                del module
                net = baselines.diffusers_unet(mcfg, shape[0], shape[1])
                if "diffusers" not in flops:
                    flops["diffusers"] = harness.training_flops_per_image(
                        net, _diffusers_forward(shape))
                data = ours.ResidentData(u8, batch, hflip)
                data.to_device(device)
                rate = baselines.train_diffusers(net, data.train_dataloader(), batch, precision, cl, steps, warmup,
                                                 device)
                rows.append(_train_row("diffusers", preset, harness.params(net), batch, precision, cl, rate,
                                       flops["diffusers"], peaks))
                print(json.dumps(rows[-2]), json.dumps(rows[-1]), sep="\n", flush=True)
    return rows


def _train_row(side, preset, params, batch, precision, cl, rate, flops, peaks) -> dict:
    return {"side": side, "preset": preset, "params": params, "batch": batch, "precision": precision,
            "channels_last": cl, "img_per_s": round(rate, 2), "gflop_per_img": round(flops / 1e9, 2),
            "mfu": round(harness.mfu(flops, rate, peaks[precision]), 4)}


def section_sample(device: str, quick: bool, peaks: dict) -> list[dict]:
    """DDIM sampling, both sides, both memory formats (channels_last helps the CIFAR U-Net's sampling
    on CPUs and hurts small GroupNorm nets in bf16, so each side is compared at its faster one)."""
    rows = []
    for preset, (experiment, shape, _, cpu_batch, _, extra) in PAIRS.items():
        n, steps = (1000, 100) if device == "cuda" else (cpu_batch, 20 if preset == "unet_cifar" else 50)
        steps = max(4, steps // 4) if quick else steps
        overrides = [f"model={preset}", "data.download=false", *extra]
        mcfg = ours.model_cfg(ours.bench_cfg(experiment, "32-true", False, 1, overrides))
        fwd = None  # forward FLOPs per image: the same for every precision and memory format
        for precision in PRECISIONS[device]:
            for cl in (False, True):
                cfg = ours.bench_cfg(experiment, precision, cl, 1, overrides)
                dtype = "bf16" if precision == "bf16-mixed" else None
                module = ours.module_for(cfg, device)
                fwd = fwd or harness.forward_flops_per_image(module.net, _ours_forward(shape))
                ours.sample(module, min(n, 8), 2, device, dtype)  # warm-up (allocator, oneDNN/cuDNN kernels)
                t0 = time.perf_counter()
                ours.sample(module, n, steps, device, dtype)
                ours_s = time.perf_counter() - t0
                del module
                net = baselines.diffusers_unet(mcfg, shape[0], shape[1])
                baselines.sample_diffusers(net, min(n, 8), shape, 2, precision, cl, device)
                harness.sync(device)
                t0 = time.perf_counter()
                baselines.sample_diffusers(net, n, shape, steps, precision, cl, device)
                harness.sync(device)
                diff_s = time.perf_counter() - t0
                for side, seconds in (("ours", ours_s), ("diffusers", diff_s)):
                    rate = n / seconds
                    rows.append({"side": side, "preset": preset, "n": n, "steps": steps, "precision": precision,
                                 "channels_last": cl, "seconds": round(seconds, 3), "img_per_s": round(rate, 2),
                                 "mfu": round(harness.mfu(fwd * steps, rate, peaks[precision]), 4)})
                print(json.dumps(rows[-2]), json.dumps(rows[-1]), sep="\n", flush=True)
    # Per-step overhead of the loops themselves: a zero-cost net, small batch, many steps.
    cfg = ours.bench_cfg("cifar10_ddpm", "32-true", False, 1, ["data.download=false"])
    steps, n = (100, 8) if quick else (500, 8)
    null = ours.null_module(cfg, device)
    ours.sample(null, n, 5, device, None)
    t0 = time.perf_counter()
    ours.sample(null, n, steps, device, None)
    ours_us = (time.perf_counter() - t0) / steps * 1e6
    baselines.sample_diffusers(baselines.NullUNet(), n, (3, 32, 32), 5, "32-true", False, device)
    t0 = time.perf_counter()
    baselines.sample_diffusers(baselines.NullUNet(), n, (3, 32, 32), steps, "32-true", False, device)
    diff_us = (time.perf_counter() - t0) / steps * 1e6
    rows.append({"side": "overhead", "us_per_step_ours": round(ours_us, 1), "us_per_step_diffusers": round(diff_us, 1),
                 "steps": steps, "n": n})
    print(json.dumps(rows[-1]), flush=True)
    return rows


def section_solver(device: str, quick: bool) -> list[dict]:
    """DPM-Solver++(2M) at equal NFE on the same net: ours (sample_dpmpp_2m, uniform = trailing grid) vs
    diffusers' DPMSolverMultistepScheduler; img/s, the loop's own overhead per step (zero-cost net), and the
    largest difference between the two outputs from the same noise (both are the same update)."""
    from diffusion_lab.samplers import sample_dpmpp_2m

    experiment, shape, _, cpu_batch, gpu_batch, extra = PAIRS["unet_tiny"]
    n = gpu_batch if device == "cuda" else cpu_batch
    rows = []
    cfg = ours.bench_cfg(experiment, "32-true", False, 1, ["data.download=false", "timesteps=1000", *extra])
    module = ours.module_for(cfg, device)
    net = _SameNet(module.net)
    for nfe in ((10,) if quick else (10, 20)):
        ours.sample(module, min(n, 8), 2, device, None, sampler=sample_dpmpp_2m)  # warm-up
        t0 = time.perf_counter()
        x_ours = ours.sample(module, n, nfe, device, None, sampler=sample_dpmpp_2m)
        ours_s = time.perf_counter() - t0
        baselines.sample_diffusers_dpmpp(net, min(n, 8), shape, 2, device)
        t0 = time.perf_counter()
        x_diff = baselines.sample_diffusers_dpmpp(net, n, shape, nfe, device)
        harness.sync(device)
        diff_s = time.perf_counter() - t0
        gap = float((x_ours.float().cpu() - x_diff.float().cpu()).abs().max())
        for side, seconds in (("ours", ours_s), ("diffusers", diff_s)):
            rows.append({"side": side, "preset": "unet_tiny", "n": n, "nfe": nfe, "seconds": round(seconds, 3),
                         "img_per_s": round(n / seconds, 2), "max_abs_diff": round(gap, 6)})
        print(json.dumps(rows[-2]), json.dumps(rows[-1]), sep="\n", flush=True)
    steps, n = (100, 8) if quick else (500, 8)
    null = ours.null_module(cfg, device)
    ours.sample(null, n, 5, device, None, sampler=sample_dpmpp_2m)
    t0 = time.perf_counter()
    ours.sample(null, n, steps, device, None, sampler=sample_dpmpp_2m)
    ours_us = (time.perf_counter() - t0) / steps * 1e6
    baselines.sample_diffusers_dpmpp(baselines.NullUNet(), n, shape, 5, device)
    t0 = time.perf_counter()
    baselines.sample_diffusers_dpmpp(baselines.NullUNet(), n, shape, steps, device)
    diff_us = (time.perf_counter() - t0) / steps * 1e6
    rows.append({"side": "overhead", "us_per_step_ours": round(ours_us, 1), "us_per_step_diffusers": round(diff_us, 1),
                 "steps": steps, "n": n})
    print(json.dumps(rows[-1]), flush=True)
    return rows


class _SameNet(torch.nn.Module):
    """Our net behind diffusers' UNet2DModel call convention (integer t in [0, T), `.sample`): the same weights."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, return_dict=True):
        # diffusers' index t is our k = t + 1 on the grid t = k / T
        tt = torch.full((x.shape[0],), (int(t) + 1) / baselines.T_TRAIN, device=x.device)
        return type("Out", (), {"sample": self.net(x, tt, None)})()


def section_eval(device: str, quick: bool) -> dict:
    """Inception feature throughput and a KID/FID evaluation with a cold and a warm reference cache."""
    from diffusion_lab.fidelity import InceptionFeatures, ReferenceCache, fidelity_metrics

    weights = os.environ.get("DIFFUSION_LAB_INCEPTION")
    try:
        extractor = InceptionFeatures(weights, device=device, batch_size=200 if device == "cuda" else 64)
    except Exception as exc:  # no weights file and no network: say so, do not fake a number
        return {"skipped": f"Inception weights unavailable ({type(exc).__name__}: {str(exc)[:160]}); "
                           "set DIFFUSION_LAB_INCEPTION to a local torch-fidelity .pth"}
    n = 1000 if device == "cuda" else (32 if quick else 128)
    gen, ref = synthetic_u8((3, 32, 32), n), synthetic_u8((3, 32, 32), n).flip(0)
    extractor(gen[:8])
    harness.sync(device)
    t0 = time.perf_counter()
    extractor(gen)
    harness.sync(device)
    feat_rate = n / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        cache = ReferenceCache(tmp)
        key = cache.key("bench", "train", ref.shape[1:], extractor, n, 0)
        walls = []
        for _ in range(2):  # cold: reference + generated features; warm: generated only (cache hit)
            t0 = time.perf_counter()
            ref_feats, hit = cache.get(key, lambda: extractor(ref))
            fidelity_metrics(extractor(gen), ref_feats, metrics=("fid", "kid"), kid_subset_size=min(n, 1000))
            walls.append((time.perf_counter() - t0, hit))
    return {"n": n, "inception_img_per_s": round(feat_rate, 1), "fid_kid_cold_s": round(walls[0][0], 2),
            "fid_kid_warm_s": round(walls[1][0], 2), "warm_was_cache_hit": walls[1][1],
            "weights": extractor.describe()["weights"]}


def section_e2e(device: str, quick: bool) -> list[dict]:
    """MNIST simple_unet: our full pipeline (experiment=mnist_ddpm) vs the plain DataLoader loop."""
    root = os.environ.get("DIFFUSION_LAB_DATA", str(ROOT / "data"))
    rows = []
    for precision in PRECISIONS[device]:
        steps, warmup = (200, 20) if device == "cuda" else ((30 if precision == "bf16-mixed" else 10), 3)
        steps = max(3, steps // 3) if quick else steps
        cfg = ours.bench_cfg("mnist_ddpm", precision, True, warmup + steps, [f"data.root={root}"])
        try:  # only a missing dataset skips the section; any other failure is a real error
            ours.build(cfg).datamodule.setup()
        except Exception as exc:
            return [{"skipped": f"MNIST unavailable under {root} ({type(exc).__name__}: {str(exc)[:160]}); "
                                "set DIFFUSION_LAB_DATA or allow the download"}]
        rate, module = ours.train(cfg, device, warmup)
        net_cfg = ours.model_cfg(cfg)
        rows.append({"side": "ours", "precision": precision, "channels_last": True, "batch": 128,
                     "img_per_s": round(rate, 2), "params": harness.params(module.net)})
        del module
        for workers in (0, 2):
            from diffusion_lab.nets import SimpleUNet

            net = SimpleUNet(**{k: v for k, v in net_cfg.items() if k != "_target_"})
            rate = baselines.plain_loop_mnist(root, net, precision, steps, warmup, device, num_workers=workers)
            rows.append({"side": f"plain DataLoader (num_workers={workers})", "precision": precision,
                         "channels_last": False, "batch": 128, "img_per_s": round(rate, 2),
                         "params": harness.params(net)})
        for r in rows[-3:]:
            print(json.dumps(r), flush=True)
    return rows


def section_states(quick: bool) -> list[dict]:
    """Wall time from `python run.py experiment=<states recipe>` start to its results.json (NLL on 5000
    samples, the course protocol), in a fresh process, as a user would launch it."""
    rows = []
    recipes = [("states_fast", [])] if quick else [("states_fast", []), ("states", [])]
    for experiment, extra in recipes:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(ROOT / "run.py"), f"experiment={experiment}", f"hydra.run.dir={tmp}",
                   "callbacks.progress=null", "trainer.enable_progress_bar=false", *extra]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode:
                rows.append({"experiment": experiment, "error": proc.stderr.strip().splitlines()[-1:]})
                continue
            res = json.loads((Path(tmp) / "results.json").read_text())
            proto = res["protocol"]
            rows.append({"experiment": experiment, "wall_s": round(wall, 1), "train_s": proto.get("train_seconds"),
                         "sampling_s": proto.get("sampling_seconds"), "steps": proto.get("step"),
                         "nll": round(res["metrics"]["nll"], 4), "n_samples": proto["data"]["n"],
                         "sampler": f"{proto.get('sampler')}-{proto.get('steps')}"})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps everywhere (smoke run, noisier numbers)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>.json)")
    ap.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"--sections: unknown {sorted(unknown)}; expected a comma list of {', '.join(SECTIONS)}")
    device = args.device
    out = Path(args.out or HERE / "results" / f"{device}.json")
    result = json.loads(out.read_text()) if out.exists() else {}  # sections not re-run keep their numbers
    seconds = result.setdefault("section_seconds", {})
    t_start = time.perf_counter()
    result["machine"] = harness.machine(device)
    needs_peak = {"peak", "train", "sample"} & set(sections)
    peaks = section_peak(device, args.quick) if needs_peak else result.get("peak_flops")
    result["peak_flops"] = {k: round(v) for k, v in peaks.items()} if peaks else None
    print("matmul peak (TFLOP/s):", {k: round(v / 1e12, 2) for k, v in (peaks or {}).items()}, flush=True)
    if peaks is not None:
        seconds["peak"] = round(time.perf_counter() - t_start, 1)
    runners = {"train": lambda: section_train(device, args.quick, peaks),
               "sample": lambda: section_sample(device, args.quick, peaks),
               "solver": lambda: section_solver(device, args.quick),
               "eval": lambda: section_eval(device, args.quick),
               "e2e": lambda: section_e2e(device, args.quick),
               "states": lambda: section_states(args.quick)}
    for name, run in runners.items():
        if name in sections:
            t0 = time.perf_counter()
            result[name] = run()
            seconds[name] = round(time.perf_counter() - t0, 1)
            if name == "eval":
                print(json.dumps(result["eval"]), flush=True)
    result["bench_seconds"] = round(sum(seconds.values()), 1)  # all sections, also those from earlier runs
    result["quick"] = args.quick
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    md = report.render(HERE / "results")
    Path(args.results_md).write_text(md)
    print(report.summary(result))
    print(f"\nwrote {out} and {args.results_md} ({result['bench_seconds']} s)")


if __name__ == "__main__":
    main()
