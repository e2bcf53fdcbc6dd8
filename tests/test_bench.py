"""The benchmark harness (FLOP counts, timing, report) and the fused-optimizer clipping path it relies on."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import FAST, REPO, compose_cfg
from torch import nn

sys.path.insert(0, str(REPO / "benchmarks"))
import harness  # noqa: E402
import report  # noqa: E402


def test_training_flops_match_the_closed_form_of_an_mlp():
    """Linear(i, h) -> ReLU -> Linear(h, o) with an input that needs no grad: forward 2ih + 2ho, backward
    2ih (weight grad of layer 1 only) + 4ho (weight and input grad of layer 2) per image."""
    i, h, o = 12, 20, 7
    net = nn.Sequential(nn.Linear(i, h, bias=False), nn.ReLU(), nn.Linear(h, o, bias=False))
    got = harness.training_flops_per_image(net, lambda n, b: n(torch.randn(b, i)), batch=3)
    assert got == 4 * i * h + 6 * h * o
    assert net[0].weight.grad is None  # counted on a copy: the benchmarked net is untouched


def test_forward_flops_of_a_convolution():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    got = harness.forward_flops_per_image(conv, lambda n, b: n(torch.randn(b, 3, 10, 10)), batch=2)
    assert got == 2 * 3 * 8 * 9 * 10 * 10


@pytest.mark.parametrize("device, expected", [("cpu", 10 / 0.1), ("cuda", 10 * 5 / (4 * 0.1 + 1.0))])
def test_loop_timer_excludes_warmup_and_uses_the_median_on_cpu(monkeypatch, device, expected):
    """2 slow warm-up iterations (excluded), then 5 timed ones of 10 items, one of them stalled for 1 s:
    the CPU rate is the median one, the CUDA rate (one sync at each end) the overall one."""
    clock = {"now": 0.0}
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(harness, "sync", lambda device: None)
    timer = harness.LoopTimer(device, warmup=2)
    for i, seconds in enumerate([5.0, 5.0, 0.1, 0.1, 1.0, 0.1, 0.1]):
        timer.tick(i, 10)
        clock["now"] += seconds
    timer.stop()
    assert timer.rate == pytest.approx(expected)


def test_loop_timer_refuses_a_rate_without_timed_iterations():
    timer = harness.LoopTimer("cpu", warmup=3)
    timer.tick(0, 4)
    timer.stop()
    with pytest.raises(RuntimeError, match="warm-up"):
        _ = timer.rate


def _result(device="Test CPU"):
    row = lambda side, rate, **kw: {"side": side, "preset": "unet_cifar", "params": 10, "batch": 8,
                                    "precision": "bf16-mixed", "channels_last": True, "img_per_s": rate,
                                    "gflop_per_img": 1.0, "mfu": 0.1, **kw}
    return {"machine": {"device": device, "date": "2026-01-01 00:00", "torch": "t", "lightning": "l",
                        "diffusers": "d", "python": "3", "cpu_threads": 2, "cpu": "x"},
            "peak_flops": {"bf16-mixed": 2e12}, "bench_seconds": 1.0,
            "train": [row("ours", 12.0), row("diffusers", 8.0), row("diffusers", 4.0, channels_last=False)],
            "e2e": [{"side": "ours", "precision": "bf16-mixed", "img_per_s": 300.0},
                    {"side": "plain DataLoader (num_workers=0)", "precision": "bf16-mixed", "img_per_s": 100.0},
                    {"side": "plain DataLoader (num_workers=2)", "precision": "bf16-mixed", "img_per_s": 120.0}]}


def test_results_markdown_reads_back_the_ratios(tmp_path):
    (tmp_path / "cpu.json").write_text(json.dumps(_result()))
    md = report.render(tmp_path)
    assert "## Test CPU — 2026-01-01 00:00" in md
    assert "train unet_cifar: best vs best 1.50x" in md          # 12 / max(8, 4)
    assert "end to end @ bf16-mixed: 2.50x" in md and "num_workers=2" in md  # 300 / max(100, 120)
    assert "No GPU result yet" in md
    (tmp_path / "cuda.json").write_text(json.dumps(_result("Fake H100")))
    md = report.render(tmp_path)
    assert "## Fake H100" in md and "No GPU result yet" not in md


def test_bench_rejects_an_unknown_section(capsys):
    import bench

    with pytest.raises(SystemExit):
        bench.main(["--sections", "train,speed"])
    assert "unknown ['speed']" in capsys.readouterr().err


def test_diffusers_twin_has_our_parameter_count():
    pytest.importorskip("diffusers")  # bench extra only
    import baselines

    from diffusion_lab.nets import UNet

    for preset, data, shape in (("unet_cifar", "cifar10", (3, 32)), ("unet_tiny", "mnist", (1, 28))):
        cfg = compose_cfg([f"model={preset}", f"data={data}"]).model
        mcfg = {k: v for k, v in dict(cfg).items() if k != "_target_"}
        ours = UNet(**mcfg)
        theirs = baselines.diffusers_unet(mcfg, *shape)
        assert harness.params(theirs) == harness.params(ours), preset


# --- fused Adam + gradient clipping (Lightning refuses it under any mixed precision) -------------------


def _module(tmp_path, precision: str, clip: float):
    from diffusion_lab.build import build, build_trainer

    cfg = compose_cfg(["experiment=states", *FAST, f"trainer.precision={precision}", "trainer.max_steps=2",
                       f"trainer.gradient_clip_val={clip}", "data.batch_size=64", "optimizer.fused=true",
                       "callbacks.checkpoint=null", "logger=none"], run_dir=tmp_path)
    parts = build(cfg)
    return parts, build_trainer(cfg, tmp_path)


def test_fused_adam_is_clipped_under_bf16(tmp_path):
    parts, trainer = _module(tmp_path, "bf16-mixed", 0.05)
    norms = []
    opt_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        out = opt_step(self, *args, **kwargs)  # closure runs forward, backward and clipping first
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in parts.module.net.parameters()]).item())
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", step)
        trainer.fit(parts.module, datamodule=parts.datamodule)
    assert trainer.optimizers[0].defaults["fused"] is True
    assert len(norms) == 2 and max(norms) == pytest.approx(0.05, rel=1e-3)


def test_fused_adam_under_an_fp16_grad_scaler_keeps_lightnings_refusal(tmp_path):
    """Scaled fp16 grads must not be clipped before the fused step unscales them: that case still goes to
    Lightning, which refuses. (On the CPU Lightning swaps 16-mixed for bf16, so the plugin is faked in.)"""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision

    parts, _ = _module(tmp_path, "bf16-mixed", 1.0)
    module = parts.module
    opt = torch.optim.AdamW(module.net.parameters(), fused=True)
    module._trainer = SimpleNamespace(precision_plugin=MixedPrecision("16-mixed", "cpu"), gradient_clip_val=1.0,
                                      gradient_clip_algorithm="norm")
    for p in module.net.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        module.configure_gradient_clipping(opt, 1.0, "norm")
    assert all(bool((p.grad == 1).all()) for p in module.net.parameters())  # nothing was clipped


def test_diffusers_is_never_a_runtime_import():
    """diffusers is an optional extra: no module imports it at import time. The one import is inside
    spaces.DiffusersVAESpace (space=diffusers_vae), indented in its constructor."""
    offenders = [p.name for p in (REPO / "diffusion_lab").rglob("*.py")
                 for line in p.read_text().splitlines()
                 if line.startswith(("import diffusers", "from diffusers"))
                 or (line.lstrip().startswith(("import diffusers", "from diffusers")) and p.name != "spaces.py")]
    assert offenders == []
    spaces = (REPO / "diffusion_lab" / "spaces.py").read_text().splitlines()
    lazy = [line for line in spaces if "from diffusers" in line]
    assert lazy == ["            from diffusers import AutoencoderKL"]


def test_compile_mode_reaches_torch_compile_and_stays_out_of_the_state_dict(monkeypatch):
    """train.compile + train.compile_mode (reduce-overhead = CUDA graphs on GPUs): the training forward
    goes through torch.compile(net, mode=...), checkpoints and the EMA only ever see `net`."""
    from diffusion_lab.build import build

    seen = []

    def fake_compile(net, mode=None):
        seen.append(mode)
        return lambda *args, **kwargs: net(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", fake_compile)
    module = build(compose_cfg(["experiment=states", "train.compile=true",
                                "train.compile_mode=reduce-overhead"])).module
    assert module._train_net() is module._train_net() and seen == ["reduce-overhead"]
    assert all(k.startswith(("net.", "objective.")) for k in module.state_dict())
    with pytest.raises(ValueError, match="compile_mode='fastest'"):
        build(compose_cfg(["experiment=states", "train.compile_mode=fastest"]))
