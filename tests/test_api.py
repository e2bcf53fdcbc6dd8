"""The Python API (diffusion_lab.load) and Lightning's load_from_checkpoint against the command line's task=sample."""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
from helpers import FAST, REPO, run_cli

import diffusion_lab
from diffusion_lab.errors import ConfigError
from diffusion_lab.lit import DiffusionModule
from diffusion_lab.samplers import make_denoiser

# A class-conditional points run (states_cfg: CFG-trained MLP, T=50), tiny: 20 steps, 100 samples per class.
TINY_CFG = ["experiment=states_cfg", *FAST, "trainer.max_steps=20", "eval.n_samples=100", "timesteps=50",
            "sampler.steps=20", "callbacks.checkpoint.every_n_train_steps=10", "trainer.limit_val_batches=0"]


@pytest.fixture(scope="module")
def cfg_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("api") / "states_cfg"
    proc = run_cli([*TINY_CFG, f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_api_sample_equals_training_run_samples_with_the_checkpoints_own_settings(cfg_run):
    """Defaults = the checkpoint's: its sampler (ancestral, 20 steps), its guidance (cfg at scale 1), EMA weights,
    seed 0; the training run's eval (every class + unconditional, 100 each) drew with the same code."""
    saved = torch.load(cfg_run / "samples.pt", weights_only=True)
    model = diffusion_lab.load(cfg_run / "checkpoints" / "last.ckpt", device="cpu")
    assert model.ema and model.step == 20 and model.module.num_classes == 5
    x, labels = model.sample(100, classes="all", unconditional=True, return_labels=True)
    assert torch.equal(labels, saved["labels"])
    assert torch.equal(x, saved["samples"])  # bit for bit
    assert x.dtype == torch.float32 and x.shape == (600, 2)


def test_api_sample_equals_task_sample_bit_for_bit_with_sampler_cfg_and_classes(cfg_run, tmp_path):
    """A stochastic sampler (DDIM eta 0.5: the generator's stream matters), CFG at scale 3, classes by index and
    by name, unconditional rows, seed 7: task=sample's samples.pt and the API's tensor are identical."""
    ckpt = cfg_run / "checkpoints" / "last.ckpt"
    proc = run_cli(["task=sample", f"ckpt={ckpt}", "sampler=ddim", "sampler.steps=10", "sampler.eta=0.5",
                    "guidance=cfg", "guidance.scale=3.0", "eval.classes=[0,Idaho]", "eval.unconditional=true",
                    "eval.n_samples=50", "eval.seed=7", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = torch.load(tmp_path / "samples.pt", weights_only=True)
    model = diffusion_lab.load(ckpt, device="cpu")
    x, labels = model.sample(50, sampler="ddim", steps=10, eta=0.5, guidance=3.0, classes=[0, "Idaho"],
                             unconditional=True, seed=7, return_labels=True)
    assert labels.tolist() == [0] * 50 + [3] * 50 + [-1] * 50 and torch.equal(labels, cli["labels"])
    assert torch.equal(x, cli["samples"])
    assert not torch.equal(model.sample(50, sampler="ddim", steps=10, eta=0.5, guidance=3.0, classes=[0, "Idaho"],
                                        unconditional=True, seed=8), x)  # the seed is honoured
    # evaluate = task=sample's body: the same metrics and protocol as the CLI's results.json
    res = model.evaluate(tmp_path / "api", sampler="ddim", steps=10, sampler_options={"eta": 0.5}, guidance=3.0,
                         classes=[0, "Idaho"], unconditional=True, n_samples=50, seed=7)
    cli_res = json.loads((tmp_path / "results.json").read_text())
    assert res["metrics"] == pytest.approx(cli_res["metrics"], rel=1e-12)
    keys = ("sampler", "steps", "eta", "nfe", "guidance", "guidance_scale", "classes", "n_samples", "sample_seed",
            "ema", "step")
    assert {k: res["protocol"][k] for k in keys} == {k: cli_res["protocol"][k] for k in keys}
    assert torch.equal(torch.load(tmp_path / "api" / "samples.pt", weights_only=True)["samples"], x)
    # evaluate restored the checkpoint's own guidance afterwards
    assert model.make_guidance().scale == 1.0


def test_denoise_is_the_affine_denoiser_contract(cfg_run):
    """xt = alpha x0_hat + sigma eps_hat for every objective's to_x0_eps; CFG at scale 1 equals the conditional net."""
    model = diffusion_lab.load(cfg_run / "checkpoints" / "last.ckpt", device="cpu")
    g = torch.Generator().manual_seed(0)
    xt, t = torch.randn(16, 2, generator=g), torch.rand(16, generator=g) * 0.9 + 0.05
    alpha, sigma = model.module.objective.schedule.alpha_sigma(t)
    for classes, guidance in ((None, None), (2, 1.0), (2, 4.0), ([0, 1] * 8, 2.0)):
        x0_hat, eps_hat = model.denoise(xt, t, classes=classes, guidance=guidance)
        assert torch.allclose(alpha[:, None] * x0_hat + sigma[:, None] * eps_hat, xt, atol=1e-5)
    conditional = model.denoise(xt, 0.3, classes=2, guidance=1.0)[0]
    with torch.no_grad():  # the raw conditional net, without any guidance wrapper
        direct = make_denoiser(model.module.net, model.module.objective,
                                                      torch.full((16,), 2))(xt, torch.full((16,), 0.3))[0]
    assert torch.allclose(conditional, direct, atol=1e-6)
    assert not torch.allclose(model.denoise(xt, 0.3, classes=2, guidance=4.0)[0], conditional, atol=1e-3)


def test_load_from_checkpoint_is_lightnings_loader_with_the_stored_config(cfg_run):
    ckpt = cfg_run / "checkpoints" / "last.ckpt"
    module = DiffusionModule.load_from_checkpoint(ckpt)
    stored = torch.load(ckpt, weights_only=True)
    assert isinstance(module, DiffusionModule) and not module.training and module.device.type == "cpu"
    assert all(torch.equal(v, stored["state_dict"][k]) for k, v in module.state_dict().items())  # EMA weights
    raw = DiffusionModule.load_from_checkpoint(ckpt, use_ema=False)
    assert all(torch.equal(v, stored["current_model_state"][k]) for k, v in raw.state_dict().items())
    assert not all(torch.equal(v, raw.state_dict()[k]) for k, v in module.state_dict().items())
    # the same model as the API's: same samples
    model = diffusion_lab.load(ckpt, device="cpu")
    assert torch.equal(module.sample(64, torch.Generator().manual_seed(1)),
                       model.module.sample(64, torch.Generator().manual_seed(1)))
    with pytest.raises(TypeError, match="hparams_file"):
        DiffusionModule.load_from_checkpoint(ckpt, hparams_file="h.yaml")


def test_api_refuses_bad_requests_in_one_line(cfg_run, tmp_path):
    model = diffusion_lab.load(cfg_run / "checkpoints" / "last.ckpt", device="cpu")
    cases = [(dict(sampler="ddpm"), "sampler=ddpm: unknown choice; allowed: ancestral, ddim"),
             (dict(sampler="ddim", steps=0), "sampler.steps=0"),
             (dict(sampler="ddim", etta=0.5), "sampler.etta=0.5: not an option"),
             (dict(classes=[7]), "classes=[7]: unknown class 7"),
             (dict(guidance=-1.0), "guidance.scale=-1.0"),
             (dict(classes=torch.zeros(3, dtype=torch.long)), "3 labels for n=10"),
             (dict(precision="fp8"), "precision=fp8: expected one of 32")]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            model.sample(10, **kwargs)
    with pytest.raises(ConfigError, match="eval.n_sample=5: no such key"):
        model.evaluate(tmp_path, n_sample=5)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=re.escape(f"ckpt={bad}: cannot be read as a checkpoint")):
        diffusion_lab.load(bad)
    # files are data: a stored config naming a target outside conf/ is refused before anything is built
    evil = tmp_path / "evil.ckpt"
    stored = torch.load(cfg_run / "checkpoints" / "last.ckpt", weights_only=True)
    stored["config"]["model"]["_target_"] = "os.system"
    torch.save(stored, evil)
    for load in (diffusion_lab.load, DiffusionModule.load_from_checkpoint):
        with pytest.raises(ConfigError, match="refused stored config model._target_=os.system"):
            load(evil)


def test_use_from_python_example_runs(cfg_run, tmp_path, monkeypatch, capsys):
    """docs/use_from_python.py, as a user runs it, on the tiny class-conditional checkpoint."""
    monkeypatch.setattr(sys, "argv", ["use_from_python.py", str(cfg_run / "checkpoints" / "last.ckpt"),
                                      str(tmp_path), "100"])
    runpy.run_path(str(REPO / "docs" / "use_from_python.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "per-class samples: (100, 2)" in out and "load_from_checkpoint: MLP" in out
    assert (tmp_path / "api_samples.png").stat().st_size > 0
    res = json.loads((tmp_path / "evaluate" / "results.json").read_text())
    assert res["protocol"]["n_samples"] == 100 * 6 and "nll" in res["metrics"]
