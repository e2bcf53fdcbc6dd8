"""FID / KID / IS through the suite against torch-fidelity itself, the reference cache, the PNG export
read by torch-fidelity's CLI, and report.md contents."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, REPO, compose_cfg, run_cli
from test_image_runs import data_overrides

from diffusion_lab.data import MNISTDataModule
from diffusion_lab.fidelity import InceptionFeatures, fidelity_metrics

WEIGHTS = REPO.parent / "shared" / "data" / "weights" / "pt_inception-2015-12-05_reconstructed_fc-nan.pth"
MNIST_ROOT = REPO.parent / "shared" / "data"
needs_weights = pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"offline Inception weights not at {WEIGHTS}")
needs_mnist = pytest.mark.skipif(not (MNIST_ROOT / "MNIST" / "raw").is_dir(), reason="MNIST not beside the repo")
N = 40  # small-n versions of the must-show comparisons (the full 1000 vs 1000 numbers are in the README)


@pytest.fixture(scope="module")
def extractor():
    if not WEIGHTS.is_file():
        pytest.skip(f"offline Inception weights not at {WEIGHTS}")
    return InceptionFeatures(str(WEIGHTS), "cpu", batch_size=64)


@pytest.fixture(scope="module")
def mnist():
    if not (MNIST_ROOT / "MNIST" / "raw").is_dir():
        pytest.skip("MNIST not beside the repo")
    dm = MNISTDataModule(root=str(MNIST_ROOT), download=False)
    return dm.real_uint8("train", N), dm.real_uint8("test", N)


@pytest.fixture(scope="module")
def feats(extractor, mnist):
    """Inception features of the N train and N test digits, extracted once for the tests below (~8 s a pass)."""
    train, test = mnist
    return extractor(train), extractor(test)


class _U8(torch.utils.data.Dataset):
    """What torch-fidelity's API takes: a Dataset of uint8 (3, H, W) tensors."""

    def __init__(self, x):
        self.x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def test_fid_kid_equal_a_direct_torch_fidelity_call(feats, mnist):
    import torch_fidelity

    train, test = mnist
    ours, notes = fidelity_metrics(feats[1], feats[0], ["fid", "kid"], kid_subsets=20,
                                   kid_subset_size=1000)
    direct = torch_fidelity.calculate_metrics(input1=_U8(test), input2=_U8(train), cuda=False, fid=True, kid=True,
                                              kid_subsets=20, kid_subset_size=N, verbose=False,
                                              feature_extractor_weights_path=str(WEIGHTS))
    assert notes["kid_subset_size"] == N  # clamped from 1000: torch-fidelity would refuse 1000 > 40
    assert ours["fid"] == pytest.approx(direct["frechet_inception_distance"], abs=1e-3)
    assert ours["kid_mean"] == pytest.approx(direct["kernel_inception_distance_mean"], abs=1e-3)
    assert ours["kid_std"] == pytest.approx(direct["kernel_inception_distance_std"], abs=1e-3)
    assert "fid_warning" in notes  # n < 10k is flagged as biased


def test_fid_of_uniform_noise_against_digits_is_huge(extractor, mnist, feats):
    train, _ = mnist
    noise = torch.randint(0, 256, train.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ours, _ = fidelity_metrics(extractor(noise), feats[0], ["fid"])
    same, _ = fidelity_metrics(feats[0], feats[0], ["fid"])
    assert ours["fid"] > 300 and abs(same["fid"]) < 1e-2  # identical sets: FID 0 up to sqrtm round-off


def test_isc_unavailable_with_fc_less_weights_and_exact_on_uniform_logits(feats):
    train = feats[0]
    assert not torch.isfinite(train["logits_unbiased"]).all()  # the offline weights have no fc layer
    out, notes = fidelity_metrics(train, train, ["isc", "kid"])
    assert "isc_mean" not in out and "not finite" in notes["isc_unavailable"] and "kid_mean" in out
    flat = {"2048": train["2048"], "logits_unbiased": torch.zeros(N, 1008)}  # p(y|x) = marginal: IS = 1
    out, _ = fidelity_metrics(flat, flat, ["isc"], isc_splits=4)
    assert out["isc_mean"] == pytest.approx(1.0) and out["isc_std"] == pytest.approx(0.0, abs=1e-12)


def test_unknown_metric_is_refused():
    dummy = {"2048": torch.zeros(2, 4), "logits_unbiased": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match=r"metrics=\['fid', 'is'\]: unknown \['is'\]"):
        fidelity_metrics(dummy, dummy, ["fid", "is"])


@needs_weights
@needs_mnist
def test_reference_cache_is_hit_on_the_second_evaluation(tmp_path, mnist):
    from diffusion_lab.domains import image_fidelity

    cfg = compose_cfg(["experiment=mnist_ddpm", f"data.root={MNIST_ROOT}", "eval.metrics=[fid,kid]",
                       f"eval.fidelity.weights={WEIGHTS}", f"eval.fidelity.cache_dir={tmp_path / 'cache'}"])
    dm = MNISTDataModule(root=str(MNIST_ROOT), download=False)
    samples = mnist[1][:16]
    calls = []
    real = InceptionFeatures.__call__

    def counting(self, images):
        calls.append(len(images))
        return real(self, images)

    InceptionFeatures.__call__ = counting
    try:
        first, p1 = image_fidelity(samples, dm, cfg, torch.device("cpu"))
        second, p2 = image_fidelity(samples, dm, cfg, torch.device("cpu"))
    finally:
        InceptionFeatures.__call__ = real
    assert calls == [16, 16, 16]  # reference (16) + generated (16), then only the generated side
    assert p1["reference"]["cache_hit"] is False and p2["reference"]["cache_hit"] is True
    assert first == second and p1["reference"]["n"] == 16
    key = p1["reference"]["cache_key"]
    assert re.fullmatch(r"mnist-train-28x28-inception-v3-compat-[0-9a-f]{12}-n16-seed0", key)
    assert (tmp_path / "cache" / f"{key}.pt").is_file()
    assert p1["weights_sha256"] == p2["weights_sha256"] and len(p1["weights_sha256"]) == 64


def fidelity_cli(*args: str) -> dict:
    """torch-fidelity's own command line, offline: the weights flag the README recipe documents."""
    proc = subprocess.run([str(Path(sys.executable).with_name("fidelity")), "--cpu", "--json", "--no-cache",
                           "--feature-extractor-weights-path", str(WEIGHTS), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


@pytest.mark.slow  # ~40-80 s (two Inception passes plus the CLI's own); the default suite is over budget
@needs_weights
def test_exported_real_pngs_and_generated_pngs_give_the_suites_kid_through_the_fidelity_cli(tmp_path):
    """task=export writes the real test digits the suite's reference uses (the same seeded subset), task=evaluate
    writes the generated samples/ folder and the suite's KID; torch-fidelity's CLI on the two folders (README
    recipe: --feature-extractor-weights-path, --kid-subset-size below 1000) gives the same KID. 20 images a side:
    Inception on the CPU runs four times here (suite and CLI, real and generated)."""
    n = 20
    data = data_overrides("mnist", tmp_path)
    export = tmp_path / "export"
    proc = run_cli(["experiment=mnist_ddpm", "task=export", "task.split=test", f"task.n={n}", *data,
                    f"hydra.run.dir={export}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    real = sorted((export / "real").glob("*.png"))
    assert len(real) == n and json.loads((export / "results.json").read_text())["protocol"]["n"] == n
    from PIL import Image

    dm = MNISTDataModule(root=data[0].split("=", 1)[1], download=False)
    first = torch.from_numpy(np.array(Image.open(real[0])))
    assert torch.equal(first, dm.real_uint8("test", n)[0, 0])  # lossless: the suite's reference image 0

    generated = dm.real_uint8("train", n).float() / 127.5 - 1  # "samples": other digits, plus noise
    noise = torch.randn(generated.shape, generator=torch.Generator().manual_seed(0))
    generated = (generated + 0.3 * noise).clamp(-1, 1)
    np.savez(tmp_path / "gen.npz", samples=generated.numpy())
    run = tmp_path / "evaluate"
    proc = run_cli(["experiment=mnist_ddpm", "task=evaluate", f"samples={tmp_path / 'gen.npz'}", "eval.metrics=[kid]",
                    "eval.reference.split=test", f"eval.reference.n={n}", f"eval.fidelity.weights={WEIGHTS}",
                    f"eval.fidelity.cache_dir={tmp_path / 'cache'}", *data, f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    suite = json.loads((run / "results.json").read_text())
    assert suite["protocol"]["kid_subset_size"] == n and len(list((run / "samples").glob("*.png"))) == n
    cli = fidelity_cli("--kid", "--kid-subset-size", str(n), "--input1", str(run / "samples"),
                       "--input2", str(export / "real"))
    assert cli["kernel_inception_distance_mean"] == pytest.approx(suite["metrics"]["kid_mean"], abs=1e-6)
    assert cli["kernel_inception_distance_std"] == pytest.approx(suite["metrics"]["kid_std"], abs=1e-6)
    assert suite["metrics"]["kid_mean"] > 1e-3  # noisy digits vs clean ones: a real difference was measured


# task=export's refusals (point data, an unknown split) are cases of tests/bad_inputs.yaml (test_reliability).


def _table(report: str) -> dict[str, str]:
    return dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", report, flags=re.M))


def test_states_report_md(tmp_path):
    proc = run_cli(["experiment=states", *FAST, "trainer.max_steps=20", "eval.n_samples=200", "timesteps=50",
                    "sampler.steps=20", "data.batch_size=500", "callbacks.metrics.every_n_steps=10",
                    "callbacks.metrics.n=100", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    rows = _table(report)
    from diffusion_lab.nets import MLP

    assert int(rows["parameters"]) == sum(p.numel() for p in MLP(2).parameters())  # independent count
    assert rows["iterations"] == "20" and rows["effective batch size"] == "500"
    assert rows["devices"] == "1 x cpu" and float(rows["device hours"]) > 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert float(rows["nll"]) == pytest.approx(results["metrics"]["nll"], rel=1e-5)
    for png in ("loss_curve.png", "samples.png"):
        assert f"]({png})" in report and (tmp_path / png).is_file()
    assert '"sampler": "ancestral"' in report  # the protocol block
    assert float(rows["final loss mean last 10pct"]) > 0
    macs = 3 * 256 + 3 * 256 * 256 + 256 * 2  # the MLP's multiply-adds per sample, layer by layer (in x out)
    assert float(rows["forward GFLOPs per sample"]) * 1e9 == pytest.approx(macs)
    assert float(rows["training FLOPs"]) == pytest.approx(3 * macs * 20 * 500, rel=1e-5)  # 3 x forward x samples
    assert float(rows["sampling FLOPs"]) == pytest.approx(200 * 20 * macs, rel=1e-5)  # n x NFE x forward
    from diffusion_lab.report import read_scalars

    steps, flops = read_scalars(tmp_path, "compute/train_flops")  # logged at logging steps, vs samples so far
    assert steps and all(f == pytest.approx(3 * macs * 500 * (s + 1), rel=1e-6) for s, f in zip(steps, flops))

    steps, values = read_scalars(tmp_path, "eval_during/nll")  # in-training evaluation, read back from TensorBoard
    assert steps == [10, 20] and all(1.5 < v < 6 for v in values)


@needs_weights
def test_mnist_report_md_with_image_metrics(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(["experiment=mnist_ddpm", "debug=fast", "callbacks.progress=null", "eval.n_samples=8",
                    "eval.metrics=[fid,kid,isc]", f"eval.fidelity.weights={WEIGHTS}",
                    f"eval.fidelity.cache_dir={tmp_path / 'cache'}", *data_overrides("mnist", tmp_path),
                    f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    m, proto = results["metrics"], results["protocol"]
    assert {"fid", "kid_mean", "kid_std"} <= set(m) and "isc_mean" not in m
    assert proto["reference"]["n"] == 8 and proto["kid_subset_size"] == 8 and "isc_unavailable" in proto
    rows = _table((run / "report.md").read_text())
    assert rows["iterations"] == "4" and rows["effective batch size"] == "4"
    assert float(rows["fid"]) == pytest.approx(m["fid"], rel=1e-5)
    assert int(rows["parameters"]) > 0 and "](samples.png)" in (run / "report.md").read_text()


def test_bad_metric_name_and_missing_weights_fail_in_one_line_before_sampling(tmp_path):
    base = ["experiment=mnist_ddpm", "debug=fast", "callbacks.progress=null", *data_overrides("mnist", tmp_path)]
    for extra, message in (
        (["eval.metrics=[fid,is]"], "eval.metrics=['fid', 'is']: unknown ['is']"),
        (["eval.metrics=[kid]", f"eval.fidelity.weights={tmp_path / 'nope.pth'}"], "eval.fidelity.weights="),
        ([f"eval.judge={tmp_path / 'nope.ckpt'}", "eval.classes=all"], "eval.judge="),
    ):
        proc = run_cli([*base, *extra, f"hydra.run.dir={tmp_path / 'run'}"])
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and message in err[0], (extra, proc.stderr[-1500:])
        assert not (tmp_path / "run" / "checkpoints").exists()  # failed before training started
