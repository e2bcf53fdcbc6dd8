"""Console and run.log: only what a user needs on the console, everything in run.log, files with the user's umask,
and a report.md that does not depend on the logger."""

from __future__ import annotations

import io
import json
import os
import stat
from types import SimpleNamespace

import pytest
import yaml
from helpers import REPO, run_cli

from diffusion_lab.fileio import atomic_path, atomic_write_text, current_umask

# A tiny STATES run with the console a user gets (progress bar, model summary), the CSV logger and sample grids.
RUN = ["trainer.max_steps=20", "trainer.log_every_n_steps=5", "data.batch_size=64", "data.steps_per_epoch=8",
       "eval.n_samples=200", "timesteps=50", "sampler.steps=10", "model.hidden=32", "logger=csv",
       "callbacks.samples.every_n_steps=10", "callbacks.samples.n=100", "callbacks.checkpoint.every_n_train_steps=10",
       "trainer.precision=bf16-mixed",
       "trainer.deterministic=true", "trainer.benchmark=true"]  # the last two: Lightning warns they conflict
NOISE = ("litlogger", "LeafSpec", "Total Flops", "| FLOPs", "/-2", "v_num", "TPU available", "100% of the batches",
         "not supported by the model summary")


@pytest.fixture
def umask027():
    previous = os.umask(0o027)
    yield 0o640
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_run_console_is_quiet_run_log_complete_files_umask_report_logger_free(tmp_path, umask027):
    run_dir = tmp_path / "run"
    proc = run_cli([*RUN, f"hydra.run.dir={run_dir}"], env={"DIFFUSION_LAB_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    for noise in NOISE:
        assert noise not in console, (noise, console[-4000:])
    # the model summary states the real forward FLOPs (1 multiply-add = 1 FLOP; compute.py) of the MLP
    forward = json.loads((run_dir / "results.json").read_text())["protocol"]["compute"]["forward_gflops"]
    assert f"{forward:<10.4g}GFLOPs per denoiser forward" in console
    assert "sampling 200" in proc.stderr  # the final sampling's progress bar (forced on: not a terminal here)

    log = (run_dir / "run.log").read_text()
    assert "[lightning.pytorch" in log and "GPU available" in log  # Lightning's own messages
    assert "Trainable params" in log  # the model summary
    assert "[py.warnings][WARNING]" in log and "deterministic=True` and `benchmark=True`" in log  # a warning
    assert console.count("GPU available: False") == 1  # Lightning's lines once, not also through the root logger
    assert "[diffusion_lab][INFO] - results:" in log

    # every output through the atomic writer and the others: 0666 & ~umask (0027 -> 0640), not mkstemp's 0600
    outputs = ["results.json", "config.yaml", "config.sha256", "report.md", "samples.png", "loss_curve.png",
               "checkpoints/last.ckpt", "checkpoints/step0000010.ckpt", "monitor/step_0000010.png", "samples.npz"]
    for name in outputs:
        assert _mode(run_dir / name) == umask027, (name, oct(_mode(run_dir / name)))

    # logger=csv: throughput, final loss and the loss curve come from the in-process History (no TensorBoard)
    from diffusion_lab.report import read_scalars

    assert read_scalars(run_dir, "train/loss") == ([], [])  # (tensorboard/ holds only the HPARAMS summary)
    report = (run_dir / "report.md").read_text()
    rows = dict(line.strip("|").split("|")[:2] for line in report.splitlines() if line.count("|") == 3)
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert float(rows["throughput samples per sec median"]) > 0
    assert 0 < float(rows["final loss mean last 10pct"]) < 10
    assert "![Loss curve](loss_curve.png)" in report
    assert "[monitor/step_0000010.png](monitor/step_0000010.png)" in report  # every figure is linked
    # epochs = samples seen / training items (20 steps x 64 of the STATES training set), not Lightning's count
    data = json.loads((run_dir / "results.json").read_text())["protocol"]["data"]
    assert rows["epochs"] == f"{round(20 * 64 / data['train_n'], 4):.6g}"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert rows["lr"] == f"{config['optimizer']['lr']:.6g}" and rows["batch_size"] == "64"
    assert rows["EMA decay"] == f"{config['callbacks']['ema']['decay']:.6g}"
    assert rows["T (timesteps)"] == "50" and rows["optimizer"] == "AdamW"
    import lightning
    import torch

    assert rows["torch"] == torch.__version__ and rows["lightning"] == lightning.__version__
    if (REPO / ".git").exists():  # a git checkout (a clone or a worktree): its commit, no machine path
        assert len(rows["git commit"].removesuffix("-dirty")) == 40


def test_atomic_writer_honours_umask_and_leaves_nothing_on_failure(tmp_path, umask027):
    assert current_umask() == 0o027
    atomic_write_text(tmp_path / "a.json", "{}")
    assert _mode(tmp_path / "a.json") == 0o640 and (tmp_path / "a.json").read_text() == "{}"
    (tmp_path / "b.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "b.txt") as tmp:
        open(tmp, "w").write("half")
        raise RuntimeError("killed mid-write")
    assert (tmp_path / "b.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json",
                                                                                                      "b.txt"]


@pytest.mark.parametrize("limits, want", [
    ({"max_epochs": -1, "max_steps": 6000, "num_training_batches": 300}, "Epoch 15/20"),  # the 14/-2
    ({"max_epochs": 30, "max_steps": -1, "num_training_batches": 300}, "Epoch 15/30"),
    ({"max_epochs": -1, "max_steps": -1, "num_training_batches": 300}, "Epoch 15"),  # a max_time budget only
    ({"max_epochs": -1, "max_steps": 6000, "num_training_batches": float("inf")}, "Epoch 15"),
])
def test_progress_bar_counts_epochs_from_one_of_the_planned_total(limits, want):
    from diffusion_lab.callbacks import ProgressBar

    bar = ProgressBar()
    bar._trainer = SimpleNamespace(accumulate_grad_batches=1, **limits)
    assert bar._get_train_description(14) == want


def test_progress_bar_stays_on_one_line_at_80_columns():
    """The stock bar (40-wide bar, v_num and long metric names) wraps at 80 columns; ours shrinks the bar."""
    from lightning.pytorch.callbacks import RichProgressBar
    from rich.console import Console
    from rich.progress import Progress, TextColumn

    from diffusion_lab.callbacks import ProgressBar

    lines = {}
    for cls, metrics in ((RichProgressBar, "v_num: 0 train/loss: 0.123"), (ProgressBar, "loss: 0.123")):
        out = io.StringIO()
        console = Console(file=out, width=80, color_system=None)
        progress = Progress(*cls().configure_columns(None), TextColumn(metrics), console=console)
        progress.update(progress.add_task("Epoch 15/20", total=300), completed=120)
        console.print(progress.make_tasks_table(progress.tasks))
        lines[cls] = out.getvalue().rstrip("\n").splitlines()
    assert len(lines[RichProgressBar]) > 1  # the failure this guards against
    assert len(lines[ProgressBar]) == 1 and "Epoch 15/20" in lines[ProgressBar][0] and "loss: 0.123" in \
        lines[ProgressBar][0]


def test_failed_run_is_one_line_on_the_console_and_a_traceback_in_run_log(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(["trainer.max_steps=20", "data.batch_size=64", "callbacks=minimal", "logger=none",
                    "+callbacks.boom._target_=killer.Raise", "+callbacks.boom.step=3", f"hydra.run.dir={run_dir}"],
                   env={"PYTHONPATH": str(REPO / "tests")})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: RuntimeError: test failure at step 3 (set ")
    assert "Traceback" not in proc.stdout + proc.stderr
    log = (run_dir / "run.log").read_text()
    assert "[diffusion_lab][ERROR] - run failed: RuntimeError: test failure at step 3" in log
    assert "Traceback (most recent call last)" in log and "killer.py" in log


def test_report_links_every_figure_and_explains_kid_std(tmp_path):
    """KID over subsets that are the whole set has a round-off std: the report says why instead of a bare 0."""
    from diffusion_lab.report import write_report

    for name in ("samples.png", "sampling.gif", "trajectory.png", "extra_plot.png", "monitor/epoch_005.png",
                 "monitor/epoch_020.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    note = "every subset is the whole set (n <= kid_subset_size): kid_std is only round-off"
    results = {"metrics": {"fid": 181.25, "kid_mean": 0.2151, "kid_std": 3.1e-09},
               "protocol": {"kid_std_note": note, "kid_subset_size": 256}}
    report = write_report(tmp_path, "t", {"iterations": 3}, results, {"Samples": "samples.png"}, config={}).read_text()
    assert f"| kid_std | 3.1e-09 ({note}) |" in report and "| fid | 181.25 |" in report
    assert "![Samples](samples.png)" in report and "![Sampling (animation)](sampling.gif)" in report
    assert "![Denoising trajectory](trajectory.png)" in report
    for name in ("extra_plot.png", "monitor/epoch_005.png", "monitor/epoch_020.png"):
        assert f"[{name}]({name})" in report
