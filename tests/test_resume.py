"""Checkpoint/resume: a run killed with SIGKILL resumes and ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import FAST, REPO, run_cli

RUN = [*FAST, "trainer.max_steps=40", "data.batch_size=256", "callbacks.checkpoint.every_n_train_steps=10",
       "eval.n_samples=100", "timesteps=50", "sampler.steps=10", "data.steps_per_epoch=25",
       "model.hidden=64", "callbacks.ema.start_step=5"]


def final_state(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    proc = run_cli([*RUN, f"hydra.run.dir={ref_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Same run, but slowed down so it can be killed between checkpoints, then SIGKILLed.
    slow = ["+callbacks.slow._target_=diffusion_lab.callbacks.Sleep", "+callbacks.slow.seconds=0.15"]
    args = [sys.executable, str(REPO / "run.py"), *RUN, f"hydra.run.dir={killed_dir}", *slow]
    child = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step20 = killed_dir / "checkpoints" / "step0000020.ckpt"
    last = killed_dir / "checkpoints" / "last.ckpt"

    def last_step() -> int:  # last.ckpt is replaced atomically, so a read never sees a partial file
        return torch.load(last, weights_only=True)["global_step"] if last.exists() else -1

    # ModelCheckpoint writes step0000020.ckpt and then last.ckpt: wait for both, then kill.
    # no deadline: a busy machine only makes this wait longer (the loop ends when the child does)
    while (not step20.exists() or last_step() < 20) and child.poll() is None:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert step20.exists(), "the run never reached its step-20 checkpoint"
    assert not (killed_dir / "results.json").exists(), "killed too late: the run had finished"
    killed = torch.load(killed_dir / "checkpoints" / "last.ckpt", weights_only=True)
    killed_at, before = killed["global_step"], killed["compute"]["train_seconds"]  # the resume starts from here
    assert 20 <= killed_at < 40

    # Re-running the same command in the same run dir resumes automatically from last.ckpt (the run dir
    # holds this config; another one would be refused, see test_rundirs.py).
    proc = run_cli([*RUN, f"hydra.run.dir={killed_dir}", *slow])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, res = final_state(ref_dir), final_state(killed_dir)
    assert res["global_step"] == ref["global_step"] == 40
    for key in ("state_dict", "current_model_state"):  # EMA weights and raw weights
        assert ref[key].keys() == res[key].keys()
        for name in ref[key]:
            assert torch.equal(ref[key][name], res[key][name]), (key, name)
    opt_ref, opt_res = ref["optimizer_states"][0]["state"], res["optimizer_states"][0]["state"]
    for i in opt_ref:
        assert torch.equal(opt_ref[i]["exp_avg"], opt_res[i]["exp_avg"])
    # compute accounting survives the kill: samples seen over both launches, training FLOPs of all 40 steps
    macs = 3 * 64 + 64 * 64 * 3 + 64 * 2  # the MLP (hidden 64): [x, t] -> 64, 3 x 64 -> 64, 64 -> x
    assert res["compute"]["samples_seen"] == ref["compute"]["samples_seen"] == 40 * 256
    spent = json.loads((killed_dir / "results.json").read_text())["protocol"]["compute"]
    assert spent["train_flops"] == 3 * macs * 40 * 256 and spent["train_loop_seconds"] > 0
    # report.md: the training time of both launches, not of the resumed one only. Truth: what the killed launch
    # had trained by the checkpoint the resume started from + the resumed launch's fit wall time (tasks.fit's own
    # clock; it also holds the resume's setup, so the loop time is at most that). The 40 steps sleep 0.15 s each
    # across the two launches: the total is at least 6 s.
    resumed = json.loads((killed_dir / "results.json").read_text())["protocol"]["train_seconds"]
    rows = {k.strip(): v.strip() for k, v, *_ in (line.strip("|").split("|") for line in
            (killed_dir / "report.md").read_text().splitlines() if line.count("|") == 3)}
    total = float(rows["train loop seconds all launches"])
    assert 0.9 * (before + resumed) <= total <= before + resumed + 0.02 and total >= 40 * 0.15
    assert float(rows["fit wall seconds this launch"]) == pytest.approx(resumed, abs=0.01)
    # epochs: 40 steps x 256 samples over the training set, a fraction (Lightning's own count says 1)
    train_n = json.loads((killed_dir / "results.json").read_text())["protocol"]["data"]["train_n"]
    assert rows["epochs"] == f"{round(40 * 256 / train_n, 4):.6g}" and rows["samples seen"] == str(40 * 256)


def test_checkpoint_write_is_atomic_and_read_is_code_free(tmp_path):
    from diffusion_lab.checkpoint_io import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("crash while writing")

    try:
        io.save_checkpoint({"step": 2, "w": Boom()}, path)
    except RuntimeError:
        pass
    assert io.load_checkpoint(path)["step"] == 1  # the old checkpoint survived the failed write
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind

    class Evil:
        def __reduce__(self):
            return (print, ("code executed",))

    torch.save({"x": Evil()}, tmp_path / "evil.ckpt")
    import pickle

    try:
        io.load_checkpoint(tmp_path / "evil.ckpt")
        raise AssertionError("weights_only load accepted an arbitrary callable")
    except pickle.UnpicklingError:
        pass


def test_ema_update_matches_closed_form_with_and_without_warmup():
    """After updates with constant model weights w_k, EMA = the decayed average (independent recursion)."""
    from diffusion_lab.callbacks import ema_multi_avg_fn

    for warmup in (False, True):
        ema = [torch.zeros(3)]
        expect = torch.zeros(3)
        fn = ema_multi_avg_fn(0.9, warmup)
        for n in range(1, 30):
            w = torch.full((3,), float(n))
            fn(ema, [w], n)
            d = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
            expect = d * expect + (1 - d) * w
        torch.testing.assert_close(ema[0], expect)


def test_every_epoch_has_its_batches_when_the_loop_stops_at_len(tmp_path):
    """Lightning takes exactly len() batches and never exhausts the iterator: the next epoch must still
    yield all its batches (a bug once made every other epoch empty and doubled the epoch count)."""
    import lightning as L
    from helpers import compose_cfg

    from diffusion_lab.build import build, build_trainer

    cfg = compose_cfg(["callbacks=minimal", "trainer.max_steps=250", "trainer.enable_progress_bar=false",
                       "trainer.enable_model_summary=false", "logger=none", "data.steps_per_epoch=100"], tmp_path)
    parts = build(cfg)
    ends = []

    class EpochEnds(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            ends.append(trainer.global_step)

    trainer = build_trainer(cfg, Path(cfg.run_dir))
    trainer.callbacks.append(EpochEnds())
    trainer.fit(parts.module, datamodule=parts.datamodule)
    assert ends == [100, 200, 250] and trainer.current_epoch == 3
    from diffusion_lab.data.lowdim import InMemoryBatches

    batches = InMemoryBatches(torch.arange(10.0)[:, None], None, batch_size=5, steps=3, seed=0)
    first = [b["x"] for _, b in zip(range(3), batches)]  # consumed like Lightning: exactly len() batches
    second = [b["x"] for b in batches]
    assert len(second) == 3 and batches.epoch == 2  # a full second epoch with its own order
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
