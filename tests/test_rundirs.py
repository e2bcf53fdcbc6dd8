"""A run dir belongs to one run: kills resume bit-identically (weights and samples), re-runs of a finished
dir reproduce it (EMA weights) or are refused, concurrent launches never share a dir, and sweeps re-run
only what truly changed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import FAST, REPO, run_cli

RUN = [*FAST, "logger=none", "trainer.max_steps=40", "data.batch_size=256", "data.steps_per_epoch=25",
       "callbacks.checkpoint.every_n_train_steps=10", "eval.n_samples=500", "timesteps=50", "sampler.steps=20",
       "model.hidden=64", "callbacks.ema.start_step=5"]
KILL_ENV = {"PYTHONPATH": str(REPO / "tests")}


def _same_weights(a: Path, b: Path) -> None:
    ra, rb = (torch.load(p / "checkpoints" / "last.ckpt", weights_only=True) for p in (a, b))
    assert ra["global_step"] == rb["global_step"] == 40
    for key in ("state_dict", "current_model_state"):  # EMA and raw weights
        for name in ra[key]:
            assert torch.equal(ra[key][name], rb[key][name]), (key, name)


def _same_samples(a: Path, b: Path) -> None:
    sa, sb = (torch.load(p / "samples.pt", weights_only=True)["samples"] for p in (a, b))
    assert torch.equal(sa, sb)
    ma, mb = (json.loads((p / "results.json").read_text())["metrics"] for p in (a, b))
    assert ma == mb


def _kill_run(tmp_path: Path, at: str) -> tuple[Path, Path]:
    """The reference (killer disarmed by its marker), the killed run, then its resume by the same command."""
    marker = tmp_path / "killed.marker"
    args = [*RUN, "+callbacks.kill._target_=killer.Kill", f"+callbacks.kill.marker={marker}",
            f"+callbacks.kill.at={at}"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    marker.write_text("disarmed")
    proc = run_cli([*args, f"hydra.run.dir={ref}"], env=KILL_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    marker.unlink()
    proc = run_cli([*args, f"hydra.run.dir={killed}"], env=KILL_ENV)
    assert proc.returncode == -9 and marker.read_text() == at  # SIGKILLed where asked
    assert not (killed / "results.json").exists()
    # a truncated temp file, as a kill in the middle of a checkpoint write leaves it
    (killed / "checkpoints" / ".tmp_abc123.ckpt").write_bytes(b"\x80\x02partial")
    proc = run_cli([*args, f"hydra.run.dir={killed}"], env=KILL_ENV)  # the same command resumes
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ref, killed


def test_kill_between_step_file_and_last_ckpt_resumes_bit_identically(tmp_path):
    ref, killed = _kill_run(tmp_path, "between")
    _same_weights(ref, killed)
    _same_samples(ref, killed)
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (ref / "checkpoints").iterdir())  # no -v1 duplicate, no .tmp_
    assert "step0000040.ckpt" in names and not any("-v" in n or n.startswith(".tmp_") for n in names)


def test_kill_during_final_sampling_resumes_bit_identically(tmp_path):
    ref, killed = _kill_run(tmp_path, "sampling")
    _same_weights(ref, killed)
    _same_samples(ref, killed)
    assert not list((killed / "checkpoints").glob(".tmp_*"))


def test_last_ckpt_holds_the_final_step_and_reproduces_the_samples(tmp_path):
    """max_steps=35 with checkpoints every 10: last.ckpt must hold step 35, and task=sample on it must
    give the run's own samples (same EMA weights, same seed)."""
    run = tmp_path / "run"
    proc = run_cli([*RUN, "trainer.max_steps=35", f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["protocol"]["step"] == 35 and results["protocol"]["ema"] is True
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 35
    proc = run_cli([*FAST, "logger=none", "task=sample", f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
                    "eval.n_samples=500", f"hydra.run.dir={tmp_path / 'sample'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_samples(run, tmp_path / "sample")

    # Re-running the same command in the finished dir reproduces it exactly, with the EMA weights.
    before = (run / "samples.pt").read_bytes()
    proc = run_cli([*RUN, "trainer.max_steps=35", f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((run / "results.json").read_text())
    assert again["metrics"] == results["metrics"] and again["protocol"]["ema"] is True
    assert torch.equal(torch.load(run / "samples.pt", weights_only=True)["samples"],
                       torch.load(__import__("io").BytesIO(before), weights_only=True)["samples"])


@pytest.mark.slow  # 13 s: two trainings launched at once; make test-slow
def test_concurrent_launches_never_share_a_dir(tmp_path):
    # Default dirs: two launches in the same second get two dirs (atomic mkdir, suffix _1).
    args = [sys.executable, str(REPO / "run.py"), *RUN, "trainer.max_steps=5", "eval.n_samples=10"]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    dirs = sorted(p.parent for p in (tmp_path / "outputs").rglob("results.json"))
    assert len(dirs) == 2 and dirs[0] != dirs[1]

    # One explicit dir: while a run is live there, a second launch is refused in one line, changing nothing.
    live = tmp_path / "live"
    slow = [*args, f"hydra.run.dir={live}", "trainer.max_steps=200",
            "+callbacks.slow._target_=diffusion_lab.callbacks.Sleep", "+callbacks.slow.seconds=0.05"]
    first = subprocess.Popen(slow, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (live / "checkpoints").exists() and first.poll() is None:  # no deadline: load only slows it
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended before the second launch"
        proc = run_cli(slow[2:])
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "in use by a live run" in lines[0], proc.stderr[-2000:]
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow  # 17 s: two sweeps of two training jobs each; make test-slow
def test_sweep_rerun_with_changed_data_path_reruns_its_jobs(tmp_path):
    import numpy as np

    from diffusion_lab.data.points import load_states_asset

    data, labels, _ = load_states_asset()
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, data=data, labels=labels)
    np.savez(b, data=data[labels < 3], labels=labels[labels < 3])
    sweep = tmp_path / "sweep"
    tiny = [*RUN, "trainer.max_steps=10", "eval.n_samples=200", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(["-m", *tiny, f"data.path={a}", "seed=0,1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = sorted(p.parent for p in sweep.rglob("results.json"))
    assert len(first) == 2 and all(str(a) in (p / "config.yaml").read_text() for p in first)
    stamps = [(p / "results.json").stat().st_mtime_ns for p in first]
    proc = run_cli(["-m", *tiny, f"data.path={a}", "seed=0,1"])  # same sweep: both jobs skipped
    assert proc.returncode == 0 and (proc.stdout + proc.stderr).count("skipping") == 2
    proc = run_cli(["-m", *tiny, f"data.path={b}", "seed=0,1"])  # other data: other jobs, run afresh
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.rglob("results.json"))
    assert len(jobs) == 4 and [(p / "results.json").stat().st_mtime_ns for p in first] == stamps
    new = [p for p in jobs if p not in first]  # the path is part of the job name (file name + hash)
    assert len(new) == 2
    for p in new:  # their numbers are the new data's, stored with the new path
        assert str(b) in (p / "config.yaml").read_text()


def test_job_dirname_keeps_path_values_as_file_name_and_hash():
    import hashlib

    from diffusion_lab import job_dirname

    digest = hashlib.sha1(b"/x/y/a.npz").hexdigest()[:6]
    assert job_dirname(3, "data.path=/x/y/a.npz,seed=0") == f"003_data.path=a.npz~{digest},seed=0"
    assert job_dirname(3, "data.path=/x/z/a.npz,seed=0") != job_dirname(3, "data.path=/x/y/a.npz,seed=0")
    assert job_dirname(0, "objective=v") == "000_objective=v"  # names without paths are unchanged
    # zero-padded: `ls` order is launch order (10 after 2), what a plain string sort gives
    names = [job_dirname(i, "seed=0") for i in range(12)]
    assert sorted(names) == names and names[10] == "010_seed=0"
    assert job_dirname("7_mnist_dit", "seed=0") == "007_mnist_dit_seed=0"  # a sweep's own `<num>_<name>` prefix


@pytest.mark.slow
def test_kills_at_random_moments_resume_bit_identically(tmp_path):
    """10 SIGKILLs at seeded random moments of a run (training, checkpoint writes, final sampling); each
    resumed by the same command must end bit-identical to the uninterrupted run, weights and samples."""
    import random

    ref = tmp_path / "ref"
    slow = ["+callbacks.slow._target_=diffusion_lab.callbacks.Sleep", "+callbacks.slow.seconds=0.02"]
    args = [*RUN, "eval.n_samples=20000", "sampler.steps=50", *slow]
    t0 = time.time()
    proc = run_cli([*args, f"hydra.run.dir={ref}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    duration = time.time() - t0
    rng = random.Random(0)
    for i in range(10):
        run = tmp_path / f"killed{i}"
        child = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args, f"hydra.run.dir={run}"], cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        child.kill()
        child.wait()
        proc = run_cli([*args, f"hydra.run.dir={run}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        _same_weights(ref, run)
        _same_samples(ref, run)
        names = [p.name for p in (run / "checkpoints").iterdir()]
        assert not any(n.startswith(".tmp_") or "-v" in n for n in names), names
