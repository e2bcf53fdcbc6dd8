"""Conditioning and guidance: CFG limits, classifier guidance on a closed-form mixture, class requests,
classifier training/loading, and the guidance experiments end to end."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, run_cli
from test_image_runs import data_overrides

from diffusion_lab import guidance as G
from diffusion_lab import objectives as O
from diffusion_lab import samplers as S
from diffusion_lab import schedules as SC
from diffusion_lab.classifier import load_classifier
from diffusion_lab.metrics import class_metrics, kde_nll
from diffusion_lab.nets import MLP, ConvClassifier, DiT, MLPClassifier, SimpleUNet, UNet

COVERED = {"states_classifier", "states_guided", "mnist_classifier", "mnist_cfg"}  # run end to end below


class SquashedVelocity(O.Objective):
    """A parametrization no guidance code has heard of: out = tanh-free affine mix 2*x0 - 0.5*eps.

    If any guidance path branched on the objective type, this one would break it.
    """

    name = "test_mix"

    def target(self, x0, eps, t):
        return 2 * x0 - 0.5 * eps

    def to_x0_eps(self, out, xt, t):
        alpha, sigma = self._coeffs(t, xt)
        # solve xt = alpha x0 + sigma eps and out = 2 x0 - 0.5 eps
        x0 = (0.5 * xt + sigma * out) / (0.5 * alpha + 2 * sigma)
        return x0, (xt - alpha * x0) / sigma


OBJECTIVES = {"eps": O.EpsPrediction, "x0": O.X0Prediction, "v": O.VPrediction, "velocity": O.VelocityPrediction,
              "novel": SquashedVelocity}
PATHS = {"eps": SC.CosineSchedule, "x0": SC.CosineSchedule, "v": SC.CosineSchedule, "velocity": SC.LinearPath,
         "novel": SC.CosineSchedule}


def toy_conditional_net(x, t, c):
    """A made-up class-conditional net: a different affine map per label, another for the null label."""
    scale = torch.where(c >= 0, c.float() + 2.0, torch.full_like(c, 0.5, dtype=torch.float))
    return torch.tanh(x * scale[:, None] + t[:, None])


@pytest.mark.parametrize("oname", list(OBJECTIVES))
def test_cfg_object_limits_and_null_rows_for_every_objective(oname):
    """ClassifierFree at scale 1 = conditional, 0 = unconditional, any scale: rows labelled -1 unguided."""
    obj = OBJECTIVES[oname](PATHS[oname](T=100) if oname != "velocity" else SC.LinearPath())
    xt, t = torch.randn(8, 2, dtype=torch.float64), torch.rand(8, dtype=torch.float64) * 0.9 + 0.05
    cond = torch.tensor([0, 1, 2, -1, 0, 1, 2, -1])
    cond_out = obj.to_x0_eps(toy_conditional_net(xt, t, cond), xt, t)
    null_out = obj.to_x0_eps(toy_conditional_net(xt, t, torch.full_like(cond, -1)), xt, t)
    for scale, want in ((1.0, cond_out), (0.0, null_out)):
        got = G.ClassifierFree(scale).denoiser(toy_conditional_net, obj, cond)(xt, t)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
    x0_5, eps_5 = G.ClassifierFree(5.0).denoiser(toy_conditional_net, obj, cond)(xt, t)
    null_rows = cond < 0
    torch.testing.assert_close(x0_5[null_rows], null_out[0][null_rows])
    # guided prediction = extrapolation: x0_5 - x0_u = 5 (x0_c - x0_u) (to_x0_eps is affine in the output)
    torch.testing.assert_close(x0_5 - null_out[0], 5 * (cond_out[0] - null_out[0]))
    # the contract xt = alpha x0_hat + sigma eps_hat still holds after guidance
    alpha, sigma = (v[:, None] for v in obj.schedule.alpha_sigma(t))
    torch.testing.assert_close(alpha * x0_5 + sigma * eps_5, xt)


def test_guidance_code_never_names_an_objective():
    """Structural check behind the behavioural ones: guidance sources mention no objective class."""
    names = [c.__name__ for c in vars(O).values() if isinstance(c, type) and issubclass(c, O.Objective)]
    sources = inspect.getsource(G) + inspect.getsource(S.guided_net) + inspect.getsource(S.classifier_guided)
    assert not [n for n in names if n in sources]
    assert "isinstance" not in inspect.getsource(S.classifier_guided) + inspect.getsource(S.guided_net)


def _two_class_mixture(path):
    """Equal-weight 1D mixture N(-2, 0.4^2), N(2, 0.4^2): exact denoiser and Bayes classifier on xt."""
    mus, tau = torch.tensor([-2.0, 2.0], dtype=torch.float64), 0.4

    def logits(xt, t):
        alpha, sigma = (v[:, None] for v in path.alpha_sigma(t))
        var = alpha**2 * tau**2 + sigma**2
        return -0.5 * (xt - alpha * mus) ** 2 / var - 0.5 * torch.log(var)

    def x0_eps(xt, t):
        alpha, sigma = (v[:, None] for v in path.alpha_sigma(t))
        w = torch.softmax(logits(xt, t), dim=1)
        x0 = (w * (mus + alpha * tau**2 / (alpha**2 * tau**2 + sigma**2) * (xt - alpha * mus))).sum(1, keepdim=True)
        return x0, (xt - alpha * x0) / sigma

    return mus, tau, logits, x0_eps


@pytest.mark.parametrize("oname", ["eps", "x0", "v", "novel"])
@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_classifier_guidance_hits_requested_class_for_any_objective(oname, sampler):
    """The exact mixture score, re-expressed as each parametrization's net output, + the Bayes
    classifier: guided samples land in the requested component with its mean and spread; label -1
    rows stay an unguided 50/50 mix."""
    path = SC.LinearSchedule(T=200, scale_with_T=True)
    obj = OBJECTIVES[oname](path)
    mus, tau, logits, x0_eps = _two_class_mixture(path)

    def net(xt, t, cond=None):  # what a perfectly trained net of this parametrization outputs
        return obj.target(*x0_eps(xt, t), t)

    n = 3000
    noise = torch.randn(3 * n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond = torch.tensor([0, 1, -1]).repeat_interleave(n)
    den = S.classifier_guided(S.make_denoiser(net, obj), logits, cond, scale=1.0, path=path, chunk=1000)
    run = {"ddim": lambda d: S.sample_ddim(d, path, noise, steps=100),
           "ancestral": lambda d: S.sample_ancestral(d, path, noise, steps=200,
                                                     generator=torch.Generator().manual_seed(1))}[sampler]
    x = run(den).squeeze(1)
    for y in (0, 1):
        xs = x[cond == y]
        assert float(((xs > 0) == bool(y)).double().mean()) > 0.99
        assert abs(float(xs.mean()) - float(mus[y])) < 0.1 and abs(float(xs.std()) - tau) < 0.1
    assert 0.42 < float((x[cond == -1] > 0).double().mean()) < 0.58


def test_requested_labels():
    names = ["Ohio", "Wisconsin", "Oklahoma"]
    labels, groups = G.requested_labels("all", names, 2)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2] and groups == names
    labels, groups = G.requested_labels(["Oklahoma", 0], names, 1, unconditional=True)
    assert labels.tolist() == [2, 0, -1] and groups == ["Oklahoma", "Ohio", "unconditional"]
    assert G.requested_labels(None, names, 5) == (None, [])
    with pytest.raises(ValueError, match=r"eval.classes=\['Texas'\]: unknown class 'Texas'"):
        G.requested_labels(["Texas"], names, 1)
    with pytest.raises(ValueError, match="unconditional"):
        G.requested_labels("all", [], 1)


def test_class_metrics_on_true_points_match_the_direct_kde():
    from diffusion_lab.data import StatesDataModule

    dm = StatesDataModule()
    x, y = dm.labelled("train")
    hx, hy = dm.labelled("heldout")
    m = class_metrics(hx, hy, x, y, dm.class_names)
    for c, name in enumerate(dm.class_names):
        assert m[f"nll/{name}"] == pytest.approx(kde_nll(hx[hy == c], x))
        assert m[f"nll_own/{name}"] == pytest.approx(kde_nll(hx[hy == c], x[y == c]))
        assert m[f"accuracy/{name}"] > 0.99  # held-out outline points are nearest to their own state
    assert m["nll_class_max"] == max(m[f"nll/{n}"] for n in dm.class_names)


def test_every_net_takes_labels_and_the_null_label():
    torch.manual_seed(0)
    nets = [(MLP(2, hidden=16, depth=2, num_classes=3), torch.randn(4, 2)),
            (SimpleUNet(1, hidden=8, num_classes=3, image_size=8), torch.randn(4, 1, 8, 8)),
            (UNet(in_channels=1, image_size=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                  num_classes=3), torch.randn(4, 1, 8, 8)),
            (DiT(2, 8, 2, size=None, depth=1, hidden_size=16, num_heads=2, num_classes=3), torch.randn(4, 2, 8, 8))]
    t = torch.full((4,), 0.3)
    for net, _ in nets[2:]:  # the U-Net zero-initialises its output conv (Ho et al.), the DiT its adaLN-Zero layers
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.1) if not p.any() else None
    for net, x in nets:
        net.eval()
        outs = [net(x, t, torch.full((4,), c)) for c in (0, 1, -1)]
        assert net.num_classes == 3
        assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])
        torch.testing.assert_close(net(x, t, None), outs[2])  # None = the null label


def test_classifier_nets_shapes_time_and_errors():
    torch.manual_seed(0)
    mlp = MLPClassifier(2, 5)
    x = torch.randn(6, 2)
    assert mlp(x, torch.zeros(6)).shape == (6, 5)
    assert not torch.allclose(mlp(x, torch.zeros(6)), mlp(x, torch.ones(6)))  # t is an input
    conv = ConvClassifier(1, 28, 10, time_conditioning=True)
    img = torch.randn(3, 1, 28, 28)
    assert conv(img, torch.zeros(3)).shape == (3, 10) and conv.features(img).shape == (3, 128)
    assert not torch.allclose(conv(img, torch.zeros(3)), conv(img, torch.ones(3)))
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 1, 28, 28\)"):
        conv(torch.randn(3, 1, 32, 32))
    with pytest.raises(ValueError, match="num_classes=1"):
        MLPClassifier(2, 1)


# ---------------------------------------------------------------- end to end through run.py

TINY = [*FAST, "timesteps=50", "trainer.max_steps=30", "callbacks.checkpoint.every_n_train_steps=10"]


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def states_runs(tmp_path_factory):
    """A tiny unconditional states model and a tiny noisy classifier on the same schedule (T=50)."""
    root = tmp_path_factory.mktemp("states_runs")
    model, clf = root / "model", root / "classifier"
    proc = run_cli(["experiment=states", *TINY, "sampler.steps=20", "eval.n_samples=100", f"hydra.run.dir={model}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(["experiment=states_classifier", *TINY, "trainer.val_check_interval=10",
                    f"hydra.run.dir={clf}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model / "checkpoints" / "last.ckpt", clf


def test_states_classifier_run_writes_checkpoint_metrics_and_prediction_map(states_runs):
    _, clf = states_runs
    res = _results(clf)
    assert {"accuracy", "accuracy_t0.5", "accuracy_t1", "train_accuracy"} <= set(res["metrics"])
    assert res["metrics"]["accuracy"] > 0.5  # 30 steps already beat chance (0.2) on clean points
    assert res["protocol"]["noisy"] is True and res["protocol"]["step"] == 30
    for name in ("prediction_map.png", "loss_curve.png", "checkpoints/last.ckpt", "config.yaml"):
        assert (clf / name).is_file(), name
    net, info = load_classifier(clf / "checkpoints" / "last.ckpt")
    assert info["noisy"] and info["num_classes"] == 5 and info["step"] == 30
    # read-back: the reloaded net reproduces the reported clean accuracy
    from diffusion_lab.classifier import accuracy
    from diffusion_lab.data import StatesDataModule
    from diffusion_lab.spaces import PointSpace

    held = StatesDataModule().labelled("heldout")
    assert accuracy(net, *held, PointSpace(2)) == pytest.approx(res["metrics"]["accuracy"])


def test_states_guided_end_to_end(states_runs, tmp_path):
    model, clf = states_runs
    proc = run_cli(["experiment=states_guided", f"ckpt={model}", f"guidance.ckpt={clf}/checkpoints/last.ckpt",
                    "timesteps=50", "sampler.steps=20", "eval.n_samples=60", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _results(tmp_path)
    names = ["Ohio", "Wisconsin", "Oklahoma", "Idaho", "Michigan"]
    for key in ("nll", "accuracy", "nll_class_max", *[f"nll/{n}" for n in names], *[f"accuracy/{n}" for n in names]):
        assert key in res["metrics"], key
    proto = res["protocol"]
    assert proto["guidance"] == "classifier" and proto["guidance_scale"] == 1.0
    assert proto["classes"] == [*names, "unconditional"] and proto["n_samples"] == 360
    assert proto["sampler"] == "ddim" and proto["steps"] == 20  # the experiment's sampler, not the ckpt's
    saved = torch.load(tmp_path / "samples.pt", weights_only=True)
    assert saved["labels"].tolist() == torch.tensor([0, 1, 2, 3, 4, -1]).repeat_interleave(60).tolist()
    for name in ("samples.png", "samples_per_class.png", "samples.npz"):
        assert (tmp_path / name).is_file(), name
    # read-back: task=evaluate on the written samples file reproduces the per-class metrics
    again = tmp_path / "evaluate"
    proc = run_cli(["task=evaluate", f"samples={tmp_path / 'samples.npz'}", f"hydra.run.dir={again}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    re_res = _results(again)
    assert re_res["protocol"]["labelled"] is True
    for key in ("nll", "nll/Ohio", "accuracy/Michigan", "nll_class_max"):
        assert re_res["metrics"][key] == pytest.approx(res["metrics"][key], rel=1e-6), key


def test_classifier_on_another_schedule_is_refused(states_runs):
    """The schedule check itself; the guided run's one-line errors (wrong or missing guidance.ckpt, CFG on an
    unconditional net, unknown classes) are cases of tests/bad_inputs.yaml, run in-process by test_reliability."""
    _, clf = states_runs
    mismatch = G.ClassifierGuidance(str(clf / "checkpoints" / "last.ckpt"))  # trained with T=50
    mismatch.check(None, SC.LinearSchedule(T=50))
    with pytest.raises(ValueError, match=r"classifier trained on schedule .*T.: 50.* but the diffusion model"):
        mismatch.check(None, SC.LinearSchedule(T=100))


@pytest.fixture(scope="module")
def mnist_judge(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge")
    proc = run_cli(["experiment=mnist_classifier", *FAST, "trainer.max_steps=20", "trainer.val_check_interval=10",
                    "trainer.limit_val_batches=2", "callbacks.progress=null", *data_overrides("mnist", root),
                    f"hydra.run.dir={root / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


def test_mnist_classifier_run(mnist_judge):
    res = _results(mnist_judge)
    assert res["protocol"]["noisy"] is False and res["protocol"]["step"] == 20
    assert set(res["metrics"]) == {"accuracy", "train_accuracy"}
    assert "test split (10000" in res["protocol"]["accuracy_on"] or "test split (1000" in res["protocol"]["accuracy_on"]
    assert (mnist_judge / "loss_curve.png").is_file()


def test_mnist_cfg_debug_fast_with_judge(mnist_judge, tmp_path):
    proc = run_cli(["experiment=mnist_cfg", "debug=fast", "callbacks.progress=null", "eval.n_samples=3",
                    "eval.batch_size=10", f"eval.judge={mnist_judge}/checkpoints/last.ckpt",
                    *data_overrides("mnist", tmp_path), f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    res = _results(run)
    m, proto = res["metrics"], res["protocol"]
    assert 0.0 <= m["judge_accuracy"] <= 1.0 and "judge_accuracy/7" in m
    assert proto["guidance"] == "classifier_free" and proto["guidance_scale"] == 5.0
    assert proto["n_samples"] == 30 and proto["n_per_class"] == 3 and proto["sample_precision"] == "bf16"
    from PIL import Image

    grid = Image.open(run / "samples.png")  # one column per digit, 3 rows: 10 x 3 tiles of 28 + 2 px
    assert grid.size == (10 * 30 + 2, 3 * 30 + 2)
    monitor = sorted((run / "monitor").glob("*.png"))
    assert monitor and Image.open(monitor[0]).size == (10 * 30 + 2, 1 * 30 + 2)  # debug=fast: n=4 < 10 -> 1 each
    labels = torch.load(run / "samples.pt", weights_only=True)["labels"]
    assert labels.tolist() == np.repeat(np.arange(10), 3).tolist()


def test_cifar10_cfg_by_override(tmp_path):
    """CFG on a U-Net experiment without a dedicated config: labels in, null label for dropout, guided grid."""
    proc = run_cli(["experiment=cifar10_ddpm", "debug=fast", "callbacks.progress=null", "model=unet_tiny",
                    "data.num_classes=10", "model.num_classes=10", "objective.p_uncond=0.1", "guidance=cfg",
                    "guidance.scale=3",
                    "eval.classes=[class0,3]", "eval.n_samples=2", *data_overrides("cifar10", tmp_path),
                    f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proto = _results(tmp_path / "run")["protocol"]
    assert proto["classes"] == ["class0", "class3"] and proto["n_samples"] == 4 and proto["guidance_scale"] == 3.0
    labels = torch.load(tmp_path / "run" / "samples.pt", weights_only=True)["labels"]
    assert labels.tolist() == [0, 0, 3, 3]
