"""The course's own data (data=cse849_states), held-out splits of points files, validation curves, and the
CSE849 deliverables; the full course recipe on the course file is slow-marked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, run_cli
from omegaconf import OmegaConf

from diffusion_lab import cse849
from diffusion_lab.build import build, load_checkpoint, make
from diffusion_lab.classifier import load_classifier, noised
from diffusion_lab.data import StatesDataModule
from diffusion_lab.data import points as P
from diffusion_lab.report import read_scalars

TINY = [*FAST, "timesteps=50", "trainer.max_steps=30", "callbacks.checkpoint.every_n_train_steps=10"]
COURSE_FILE = Path(os.environ.get("DIFFUSION_LAB_DATA", Path(__file__).resolve().parents[2] / "shared/data")) \
    / "cse849_states" / "states.pt"
# The shipped STATES asset is in suite order (Ohio, Wisconsin, Oklahoma, Idaho, Michigan); the course's file
# labels 0 Michigan, 1 Idaho, 2 Ohio, 3 Oklahoma, 4 Wisconsin.
SUITE_TO_COURSE = np.array([cse849.COURSE_LABELS.index(n) for n in P.STATE_NAMES])


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def course_like_root(tmp_path_factory) -> Path:
    """A stand-in for the course's file: the shipped points relabelled in course order, saved like the
    course's states.pt ({"data", "labels"}, no names, no held-out split) under <root>/cse849_states/."""
    root = tmp_path_factory.mktemp("data")
    data, labels, _ = P.load_states_asset()
    (root / "cse849_states").mkdir()
    torch.save({"data": torch.from_numpy(data), "labels": torch.from_numpy(SUITE_TO_COURSE[labels])},
               root / "cse849_states" / "states.pt")
    return root


# ------------------------------------------------------------------------------------------ held-out splits
def test_split_heldout_is_seeded_per_class_and_disjoint():
    labels = np.repeat(np.arange(5), [1000, 1000, 1000, 1000, 500])
    train, held = P.split_heldout(np.zeros((len(labels), 2)), labels, 0.1, seed=3)
    assert np.bincount(labels[held]).tolist() == [100, 100, 100, 100, 50]  # the data's class balance
    assert np.intersect1d(train, held).size == 0 and np.union1d(train, held).tolist() == list(range(len(labels)))
    again = P.split_heldout(np.zeros((len(labels), 2)), labels, 0.1, seed=3)[1]
    assert np.array_equal(held, again) and not np.array_equal(held, P.split_heldout(
        np.zeros((len(labels), 2)), labels, 0.1, seed=4)[1])
    for bad in (0.0, 1.0, 0.0001):
        with pytest.raises(ValueError, match="heldout_fraction"):
            P.split_heldout(np.zeros((100, 2)), np.zeros(100, int), bad)


def test_points_file_without_heldout_gets_a_split_and_keeps_all_points_as_reference(course_like_root):
    path = course_like_root / "cse849_states" / "states.pt"
    dm = StatesDataModule(path=str(path), label_names=cse849.COURSE_LABELS, name="cse849_states")
    raw = torch.load(path, weights_only=True)
    assert dm.describe()["heldout_n"] == 500 and dm.describe()["train_n"] == 4500
    assert torch.equal(dm.reference(), raw["data"])  # the protocol's KDE reference: every point of the file
    hx, hy = dm.labelled("heldout")
    tx, _ = dm.labelled("train")
    assert torch.bincount(hy).tolist() == [100] * 5
    # no held-out point is trained on: the two parts rebuild the file exactly
    assert sorted(map(tuple, torch.cat([tx, hx]).tolist())) == sorted(map(tuple, raw["data"].tolist()))
    assert dm.class_names == cse849.COURSE_LABELS and dm.labelled("all")[1].tolist() == raw["labels"].tolist()
    batches = list(dm.val_dataloader())
    assert torch.equal(torch.cat([b["x"] for b in batches]), hx)
    none = StatesDataModule(path=str(path), heldout_fraction=0.0)
    assert not none.has_split("heldout") and list(none.val_dataloader()) == []
    assert none.class_names == ["0", "1", "2", "3", "4"]


def test_label_names_and_paths_are_checked(tmp_path):
    npz = tmp_path / "named.npz"
    data, labels, names = P.load_states_asset()
    np.savez(npz, data=data, labels=labels, label_names=np.array(names))
    with pytest.raises(ValueError, match=r"label_names=\['a', 'b', 'c', 'd', 'e'\] but the points file names"):
        StatesDataModule(path=str(npz), label_names=list("abcde")).setup()
    with pytest.raises(ValueError, match="expected num_classes=5 names"):
        StatesDataModule(path=str(npz), label_names=["a"])
    with pytest.raises(ValueError, match=r"^path=.*nope.pt: file not found"):
        StatesDataModule(path=str(tmp_path / "nope.pt"))


def test_cse849_states_needs_the_course_file_one_line(tmp_path):
    proc = run_cli(["data=cse849_states", *TINY, f"hydra.run.dir={tmp_path}"],
                   env={"DIFFUSION_LAB_DATA": str(tmp_path / "empty")})
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.path=") and "cse849_states/states.pt" in err[0], err


# --------------------------------------------------------------------------------- classifier and val curves
def test_classifier_on_a_points_file_without_heldout(course_like_root, tmp_path):
    """The seeded split is the default; heldout_fraction=0 is refused in one line before any training."""
    env = {"DIFFUSION_LAB_DATA": str(course_like_root)}
    run = tmp_path / "split"
    proc = run_cli(["experiment=states_classifier", "data=cse849_states", *TINY, "trainer.val_check_interval=10",
                    f"hydra.run.dir={run}"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _results(run)
    assert res["protocol"]["data"]["heldout_n"] == 500 and "seeded split" in res["protocol"]["data"]["heldout_from"]
    assert res["protocol"]["classes"] == cse849.COURSE_LABELS
    assert res["protocol"]["accuracy_on"].startswith("heldout split (500 examples")
    assert len(read_scalars(run, "val/loss")[0]) == 3  # steps 10, 20, 30

    refused = tmp_path / "refused"
    proc = run_cli(["experiment=states_classifier", "data=cse849_states", "data.heldout_fraction=0", *TINY,
                    f"hydra.run.dir={refused}"], env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "has no heldout split" in err[0] and "data.heldout_fraction" in err[0], err
    assert not (refused / "checkpoints").exists()  # refused before training, nothing trained or saved


def test_classifier_val_loss_is_logged_and_equals_a_recomputation(tmp_path):
    """val/loss at the last step = cross-entropy of the saved (EMA) classifier on the held-out draw, noised
    with the validation's fixed per-batch generator."""
    proc = run_cli(["experiment=states_classifier", *TINY, "trainer.val_check_interval=10",
                    f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps, values = read_scalars(tmp_path, "val/loss")
    assert steps == [9, 19, 29] or steps == [10, 20, 30], steps
    net, info = load_classifier(tmp_path / "checkpoints" / "last.ckpt")
    schedule = make(info["config"], "schedule")
    x, y = StatesDataModule().labelled("heldout")
    total = 0.0
    for i, start in enumerate(range(0, len(x), 4096)):
        x0, y0 = x[start: start + 4096], y[start: start + 4096]
        xt, t = noised(schedule, x0, None, torch.Generator().manual_seed(i))
        with torch.no_grad():
            total += float(torch.nn.functional.cross_entropy(net(xt, t), y0, reduction="sum"))
    assert values[-1] == pytest.approx(total / len(x), rel=1e-4)


def test_diffusion_val_loss_is_logged_and_equals_a_recomputation(tmp_path):
    proc = run_cli(["experiment=states", *TINY, "data.steps_per_epoch=10", "sampler.steps=10", "eval.n_samples=50",
                    f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps, values = read_scalars(tmp_path, "val/loss")
    assert len(steps) == 3, steps  # one validation per epoch of 10 steps
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    parts = build(OmegaConf.create(ckpt["config"]))
    parts.module.load_state_dict(ckpt["state_dict"])  # the EMA weights, which validation also uses
    x, _ = StatesDataModule().labelled("heldout")
    total = 0.0
    for i, start in enumerate(range(0, len(x), 4096)):
        with torch.no_grad():
            per, _ = parts.module.objective.loss(parts.module.net, x[start: start + 4096],
                                                 generator=torch.Generator().manual_seed(i))
        total += float(per.sum())
    assert values[-1] == pytest.approx(total / len(x), rel=1e-4)


# ------------------------------------------------------------------------------------------ deliverables
@pytest.mark.parametrize("course_data", [pytest.param(True, marks=pytest.mark.slow), False],
                         ids=["course_order", "suite_order"])  # one order in the default suite, both in test-slow
def test_cse849_deliverables_under_course_names(course_like_root, tmp_path, course_data):
    """states -> states_classifier -> states_guided -> export; cond_gen_samples_k holds course state k whatever
    the data's own label order (read back against samples.pt)."""
    env = {"DIFFUSION_LAB_DATA": str(course_like_root)}
    data = ["data=cse849_states"] if course_data else []
    model, clf, guided, out = (tmp_path / n for n in ("model", "clf", "guided", "out"))
    for args in (["experiment=states", *data, *TINY, "sampler.steps=10", "eval.n_samples=40",
                  f"hydra.run.dir={model}"],
                 ["experiment=states_classifier", *data, *TINY, "trainer.val_check_interval=10",
                  f"hydra.run.dir={clf}"],
                 ["experiment=states_guided", f"ckpt={model}/checkpoints/last.ckpt", "timesteps=50",
                  f"guidance.ckpt={clf}/checkpoints/last.ckpt", "sampler.steps=10", "eval.n_samples=30",
                  f"hydra.run.dir={guided}"]):
        proc = run_cli(args, env=env)
        assert proc.returncode == 0, (args, proc.stderr[-3000:])
    scores = cse849.export(model, clf, guided, out)
    saved = torch.load(guided / "samples.pt", weights_only=True)
    names = cse849.COURSE_LABELS if course_data else P.STATE_NAMES
    for k, state in enumerate(cse849.COURSE_LABELS):
        got = torch.load(out / "outputs" / f"cond_gen_samples_{k}.pt", weights_only=True)
        assert torch.equal(got, saved["samples"][saved["labels"] == names.index(state)]) and got.shape == (30, 2)
        assert scores["cond_nll"][f"{k} {state}"] == _results(guided)["metrics"][f"nll/{state}"]
    uncond = torch.load(out / "outputs" / "uncond_gen_samples.pt", weights_only=True)
    assert torch.equal(uncond, torch.load(model / "samples.pt", weights_only=True)["samples"])
    den = torch.load(out / "checkpoints" / "denoiser.pt", weights_only=True)
    net = make(OmegaConf.create({"model": den["config"]}), "model")
    net.load_state_dict(den["state_dict"])  # loads into the configured net: complete and matching
    clf_saved = torch.load(out / "checkpoints" / "classifier.pt", weights_only=True)
    assert set(clf_saved["state_dict"]) == set(load_classifier(clf / "checkpoints" / "last.ckpt")[0].state_dict())
    for name in cse849.PLOTS.values():
        assert (out / "outputs" / name).is_file(), name


def test_cse849_export_refuses_missing_inputs_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cse849.main(["--states", str(tmp_path), "--classifier", str(tmp_path), "--guided", str(tmp_path),
                     "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- the course recipe
@pytest.mark.slow
@pytest.mark.skipif(not COURSE_FILE.is_file(), reason=f"the course's points file is not here ({COURSE_FILE}; "
                    "set DIFFUSION_LAB_DATA to the folder holding cse849_states/states.pt)")
def test_full_course_recipe_on_the_course_file(tmp_path):
    """states + states_classifier + states_guided with their defaults on the course's file: the course's bars
    (unconditional NLL < 2.3, every state < 2.5; 5000 samples each, KDE of all 5000 true points)."""
    env = {"DIFFUSION_LAB_DATA": str(COURSE_FILE.parents[1])}
    model, clf, guided = (tmp_path / n for n in ("model", "clf", "guided"))
    for args in (["experiment=states", "data=cse849_states", "callbacks.progress=null", f"hydra.run.dir={model}"],
                 ["experiment=states_classifier", "data=cse849_states", "callbacks.progress=null",
                  f"hydra.run.dir={clf}"],
                 ["experiment=states_guided", f"ckpt={model}/checkpoints/last.ckpt",
                  f"guidance.ckpt={clf}/checkpoints/last.ckpt", f"hydra.run.dir={guided}"]):
        proc = run_cli(args, env=env)
        assert proc.returncode == 0, (args, proc.stderr[-3000:])
    assert _results(model)["metrics"]["nll"] < 2.3
    res = _results(guided)
    assert res["protocol"]["n_per_class"] == 5000
    for state in cse849.COURSE_LABELS:
        assert res["metrics"][f"nll/{state}"] < 2.5, (state, res["metrics"])
    scores = cse849.export(model, clf, guided, tmp_path / "submission")
    assert scores["uncond_nll"] < 2.3
