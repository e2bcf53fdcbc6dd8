"""Sweeps: sweep configs, the cases sweeper, joblib / submitit launchers, one GPU per job, DDP inside a
multirun, failed jobs, skipping finished jobs, and the collector."""

from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path

import pytest
import torch
from helpers import FAST, run_cli

from diffusion_lab.report import read_scalars
from diffusion_lab.sweeps import collect

TINY = [*FAST, "trainer.max_steps=20", "eval.n_samples=200", "timesteps=50", "sampler.steps=20",
        "callbacks.checkpoint.every_n_train_steps=10"]
# Independent count for the states MLP (2-d points, 4 layers of 256, input [x, 2t - 1]): multiply-adds of one
# forward of one sample, summed layer by layer (in x out), and the recipe's batch (experiment=states).
MLP_MACS = (2 + 1) * 256 + 3 * 256 * 256 + 256 * 2
STATES_BATCH = 1000


def job_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir())


def test_parametrization_sweep_with_joblib_then_collector(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "sweep=parametrization", "hydra/launcher=local_jobs", "hydra.launcher.n_jobs=2", *TINY,
                    f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = job_dirs(sweep)
    # job dirs: <zero-padded num>_<overrides>, shortened with a stable hash when the overrides are long (these are)
    assert [j.name[:4] for j in jobs] == ["000_", "001_", "002_"] and all(len(j.name) <= 120 for j in jobs)
    assert all(f"objective={o}," in j.name for o, j in zip(("eps", "x0", "v"), jobs))
    assert all((j / "results.json").is_file() for j in jobs)
    summary = collect(sweep)
    assert summary["metric"] == "nll" and summary["status"]["ok"] == 3
    rows = list(csv.DictReader(open(sweep / "results.csv")))
    for row, job in zip(rows, jobs):  # read-back: the CSV holds each job's own results.json value
        want = json.loads((job / "results.json").read_text())["metrics"]["nll"]
        assert float(row["metric:nll"]) == pytest.approx(want)
        # TensorBoard HPARAMS view: each job's metrics, read back from its event file
        assert read_scalars(job / "tensorboard", "hparams/nll")[1] == [pytest.approx(want)]
        # the compute columns: 3 x forward x steps x batch, and n x NFE x forward (ancestral, 20 steps)
        assert int(row["compute:train_flops"]) == 3 * MLP_MACS * 20 * STATES_BATCH
        assert int(row["compute:sampling_flops"]) == 200 * 20 * MLP_MACS
        assert float(row["compute:forward_gflops"]) * 1e9 == pytest.approx(MLP_MACS)
        assert (row["protocol:backbone"], row["protocol:space"], row["compute:samples_seen"]) == ("MLP", "points",
                                                                                                  "20000")
    table = (sweep / "results.md").read_text()
    assert "| objective |" in table.splitlines()[0] and table.count("| ok |") == 3
    assert "| train_flops |" in table.splitlines()[0] and f"| {3 * MLP_MACS * 20 * STATES_BATCH:.3e} |" in table
    assert (sweep / "plot_nll_vs_objective.png").is_file()

    # re-running the same sweep skips finished jobs; force=true re-runs them
    stamps = [(j / "results.json").stat().st_mtime_ns for j in jobs]
    proc = run_cli(["-m", "sweep=parametrization", *TINY, f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0 and proc.stdout.count("skipping") + proc.stderr.count("skipping") == 3
    assert [(j / "results.json").stat().st_mtime_ns for j in jobs] == stamps


def test_failing_job_does_not_stop_the_others_and_is_marked(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "experiment=states", *TINY, "sampler.steps=20,0,10", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode != 0  # the sweep reports the failure ...
    jobs = job_dirs(sweep)
    assert len(jobs) == 3 and (jobs[0] / "results.json").is_file() and (jobs[2] / "results.json").is_file()
    assert "sampler.steps=0" in (jobs[1] / "error.txt").read_text()  # ... after the other jobs finished
    summary = collect(sweep)
    assert summary["status"] == {"ok": 2, "failed": 1, "unfinished": 0, "unreadable": 0}
    failed = [r for r in csv.DictReader(open(sweep / "results.csv")) if r["status"] == "failed"]
    assert len(failed) == 1 and "expected an integer >= 1" in failed[0]["error"]
    # --x: a column name without its prefix; an unknown one is refused (exit 2) before anything is rewritten
    assert collect(sweep, x=["sampling_flops"])["plots"][-1].endswith("plot_nll_vs_sampling_flops.png")
    stamp = (sweep / "results.csv").stat().st_mtime_ns
    with pytest.raises(SystemExit) as exit_info:
        collect(sweep, x=["nope"])
    assert exit_info.value.code == 2 and (sweep / "results.csv").stat().st_mtime_ns == stamp


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpt")
    proc = run_cli(["experiment=states", *TINY, f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run / "checkpoints" / "last.ckpt"


def test_cases_sweeper_sampling_steps_over_one_checkpoint(tmp_path, tiny_ckpt):
    sweep = tmp_path / "sweep"
    cases = '["sampler=ancestral sampler.steps=10","sampler=ancestral sampler.steps=50","sampler=ddim sampler.steps=5"]'
    proc = run_cli(["-m", "sweep=sampling_steps", f"ckpt={tiny_ckpt}", "eval.n_samples=100", "seed=0,1",
                    f"hydra.sweeper.cases={cases}", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((j / "results.json").read_text())["protocol"] for j in job_dirs(sweep)]
    got = sorted((p["sampler"], p["steps"], p["seed"]) for p in results)
    assert got == sorted((s, n, seed) for s, n in (("ancestral", 10), ("ancestral", 50), ("ddim", 5))
                         for seed in (0, 1))
    assert all(p["task"] == "sample" and p["step"] == 20 for p in results)  # sampling only, no retraining
    for p in results:  # training FLOPs from the checkpoint's record, sampling FLOPs of this sampling
        nfe = {"ancestral": p["steps"], "ddim": p["steps"]}[p["sampler"]]
        assert p["compute"]["train_flops"] == 3 * MLP_MACS * 20 * STATES_BATCH
        assert p["compute"]["sampling_flops"] == 100 * nfe * MLP_MACS and p["compute"]["nfe"] == nfe
    assert all((j / "samples.png").is_file() for j in job_dirs(sweep))
    summary = collect(sweep)
    assert summary["status"]["ok"] == 6 and any("vs_sampler.steps" in p for p in summary["plots"])


@pytest.fixture(scope="module")
def t500_ckpt(tmp_path_factory):
    run = tmp_path_factory.mktemp("t500")
    proc = run_cli(["experiment=states", *TINY, "timesteps=500", "trainer.max_steps=2", f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run / "checkpoints" / "last.ckpt"


def test_sampling_steps_sweep_over_a_T500_checkpoint_never_launches_an_invalid_job(tmp_path, t500_ckpt):
    """The shipped sweep=sampling_steps (ancestral up to 1000 steps) over a T=500 checkpoint: invalid=fail refuses
    it in one line, launching nothing; in the default drop mode a 700-step job is left out with one line while
    the valid one runs (the whole shipped sweep, 15 of 18 jobs launched: the slow test below)."""
    refused = tmp_path / "refused"
    proc = run_cli(["-m", "sweep=sampling_steps", f"ckpt={t500_ckpt}", "hydra.sweeper.invalid=fail",
                    f"hydra.sweep.dir={refused}"])
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert "job `sampler=ancestral sampler.steps=700`: sampler.steps=700: expected 1 <= steps <= T=500" in err[0]
    assert "nothing launched" in err[0] and (not refused.exists() or not job_dirs(refused))
    sweep = tmp_path / "sweep"
    cases = '["sampler=ancestral sampler.steps=500","sampler=ancestral sampler.steps=700"]'
    proc = run_cli(["-m", "sweep=sampling_steps", f"ckpt={t500_ckpt}", "eval.n_samples=8",
                    f"hydra.sweeper.cases={cases}", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "not launching job `sampler.steps=700`: sampler.steps=700: expected 1 <= steps <= T=500" in out
    (job,) = job_dirs(sweep)
    assert json.loads((job / "results.json").read_text())["protocol"]["steps"] == 500


@pytest.mark.slow
def test_the_whole_sampling_steps_sweep_over_a_T500_checkpoint_launches_its_15_valid_jobs(tmp_path, t500_ckpt):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "sweep=sampling_steps", f"ckpt={t500_ckpt}", "eval.n_samples=8", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    for steps in (700, 900, 1000):
        assert f"not launching job `sampler=ancestral sampler.steps={steps}`: sampler.steps={steps}: " in out
    assert "launching 15 of 18 jobs (3 invalid, left out)" in out
    jobs = job_dirs(sweep)
    assert len(jobs) == 15 and not any((j / "error.txt").exists() for j in jobs)
    launched = [json.loads((j / "results.json").read_text())["protocol"] for j in jobs]
    assert sorted(p["steps"] for p in launched if p["sampler"] == "ancestral") == [100, 300, 500]
    assert {p["sampler"] for p in launched} == {"ancestral", "ddim", "euler", "heun"}


@pytest.mark.slow  # 12 s: four joblib jobs on a faked 4-GPU machine; make test-slow
def test_fake_four_gpu_machine_gives_each_joblib_job_its_own_device(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import torch\ntorch.cuda.device_count = lambda: 4\n")
    sweep = tmp_path / "sweep"
    env_path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    proc = run_cli(["-m", "task=explore", "seed=0,1,2,3", "hydra/launcher=local_jobs", "hydra.launcher.n_jobs=2",
                    f"hydra.sweep.dir={sweep}"], env={"PYTHONPATH": env_path})
    assert proc.returncode == 0, proc.stderr[-3000:]
    devices = [json.loads((j / "results.json").read_text())["protocol"]["device"] for j in job_dirs(sweep)]
    assert devices == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]


@pytest.mark.slow  # 18 s: a 2-process DDP job inside a joblib multirun; make test-slow
def test_ddp_job_inside_a_multirun_keeps_one_output_dir_per_job(tmp_path):
    sweep, stray = tmp_path / "sweep", tmp_path / "stray"
    proc = run_cli(["-m", "experiment=states", *TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                    "seed=0,1", f"hydra.sweep.dir={sweep}", f"hydra.run.dir={stray}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not stray.exists()  # no rank re-entered Hydra with the run-dir pattern
    entries = sorted(p.name for p in sweep.iterdir())
    assert len(entries) == 3 and entries[2] == "multirun.yaml"  # two job dirs, no second sweep started by a rank
    assert entries[0].startswith("000_") and entries[1].startswith("001_")
    for job in job_dirs(sweep):
        res = json.loads((job / "results.json").read_text())
        assert res["protocol"]["world_size"] == 2 and res["protocol"]["step"] == 20
        assert (job / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow  # 17 s: the submitit launchers end to end; make test-slow
def test_submitit_launchers(tmp_path):
    proc = run_cli(["sweep=parametrization", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                    "--cfg", "hydra", "--package", "hydra.launcher"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in ("partition: gpu", "gpus_per_node: 1", "timeout_min: 240", "mem_gb: 32", "max_num_timeout: 3",
                 "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"):
        assert line in proc.stdout, line
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "experiment=states", *TINY, "seed=0,1", "hydra/launcher=submitit_local",
                    "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all((j / "results.json").is_file() for j in job_dirs(sweep)) and len(job_dirs(sweep)) == 2


def test_path_overrides_stay_in_the_table_but_make_no_plot_axis_or_legend(tmp_path):
    """A backbones-style sweep: experiments differ, the latent ones also pass space.ckpt=<path>. The table keeps
    the path; the plots group by experiment only (a path in a legend or as a bar axis tells nothing new)."""
    from diffusion_lab.sweeps import write_plots, write_table

    rows = [{"job": f"{i}_x", "status": "ok", "override:experiment": e, "metric:kid_mean": k,
             "compute:train_flops": f, "compute:parameters": 1e6,
             **({"override:space.ckpt": "/runs/ae/last.ckpt"} if "ldm" in e else {})}
            for i, (e, k, f) in enumerate([("pix", 0.2, 4e13), ("ldm", 0.02, 5e13), ("dit_ldm", 0.04, 4.5e13)])]
    written = write_plots(rows, "kid_mean", tmp_path)
    assert sorted(p.name for p in written) == ["plot_kid_mean_vs_experiment.png", "plot_kid_mean_vs_train_flops.png"]
    write_table(rows, "kid_mean", tmp_path / "results.md")
    assert "/runs/ae/last.ckpt" in (tmp_path / "results.md").read_text()


def _fake_job(root: Path, num: int, overrides: list[str], metrics: dict, protocol: dict,
              samples: torch.Tensor | None = None) -> Path:
    """A finished sweep job as the collector reads it: .hydra/overrides.yaml, results.json, samples.pt."""
    from diffusion_lab import job_dirname

    job = root / job_dirname(num, ",".join(overrides))
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "results.json").write_text(json.dumps({"metrics": metrics, "protocol": protocol}))
    if samples is not None:
        torch.save({"samples": samples, "labels": None}, job / "samples.pt")
    return job


def test_collector_mean_std_over_seeds_sweep_order_bars_and_checkpoint_column(tmp_path, monkeypatch):
    from diffusion_lab import job_dirname, plots

    nll = {("v", 0): 2.0, ("v", 1): 2.2, ("v", 2): 2.7, ("eps", 0): 3.0, ("eps", 1): 3.5, ("eps", 2): 3.1,
           ("x0", 0): 4.0, ("x0", 1): 4.4, ("x0", 2): 4.1}
    for num, ((objective, seed), value) in enumerate(nll.items()):  # sweep order v, eps, x0; 9 jobs -> 000..008
        job = tmp_path / job_dirname(num, f"objective={objective},seed={seed}")
        _fake_job(tmp_path, num, [f"objective={objective}", f"seed={seed}"], {"nll": value},
                  {"checkpoint": str(job / "checkpoints" / "last.ckpt"), "step": 20, "nfe": 50})
    figures = {}
    real = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: (figures.__setitem__(Path(path).name, fig),
                                                                 real(fig, path)))
    collect(tmp_path)
    table = (tmp_path / "results.md").read_text()
    for objective in ("v", "eps", "x0"):  # statistics.stdev: the sample std (n - 1), an independent formula
        values = [nll[(objective, s)] for s in range(3)]
        want = f"| {objective} | 3 | {statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} |"
        assert want in table, table
    assert "| checkpoint |" in table.splitlines()[0]  # each job's own checkpoint, relative to the sweep dir
    assert "| 004_objective=eps,seed=1/checkpoints/last.ckpt | 20 |" in table
    ax = figures["plot_nll_vs_objective.png"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["v", "eps", "x0"]  # the sweep's order, not sorted
    heights = [bar.get_height() for bar in ax.patches]
    assert heights == pytest.approx([statistics.mean([nll[(o, s)] for s in range(3)]) for o in ("v", "eps", "x0")])


def test_collector_plots_nfe_on_log_x_and_draws_one_sample_per_step_count(tmp_path, monkeypatch):
    from diffusion_lab import plots
    from diffusion_lab.spaces import to_uint8

    settings = [("ancestral", 100, 100), ("ancestral", 10, 10), ("ancestral", 300, 300), ("heun", 10, 19),
                ("heun", 5, 9)]
    images = {}
    for num, (sampler, steps, nfe) in enumerate(settings):
        x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(num)) * 2 - 1
        images[(sampler, steps)] = to_uint8(x[:1])[0].permute(1, 2, 0).numpy()
        _fake_job(tmp_path, num, [f"sampler={sampler}", f"sampler.steps={steps}"], {"kid_mean": 1 / nfe},
                  {"sampler": sampler, "steps": steps, "nfe": nfe}, samples=x)
    figures, tables = {}, []
    real_table = plots.plot_sample_table
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.__setitem__(Path(path).name, fig))
    monkeypatch.setattr(plots, "plot_sample_table", lambda table, **kw: (tables.append(table),
                                                                         real_table(table, **kw))[1])
    summary = collect(tmp_path)
    assert figures["plot_kid_mean_vs_nfe.png"].axes[0].get_xscale() == "log"
    assert figures["plot_kid_mean_vs_sampler.steps.png"].axes[0].get_xscale() == "log"  # 5..300 steps
    assert str(tmp_path / "samples_vs_steps.png") in summary["plots"]
    (table,) = tables
    assert list(table) == ["ancestral", "heun"]  # a row per sampler, in sweep order; steps ascending in each
    assert [name for name, _ in table["ancestral"]] == ["10 steps", "100 steps", "300 steps"]
    assert [name for name, _ in table["heun"]] == ["5 steps\nNFE 9", "10 steps\nNFE 19"]
    for (sampler, _), (name, value) in zip([("ancestral", 0)] * 3, table["ancestral"]):
        steps = int(name.split()[0])
        assert (value == images[(sampler, steps)]).all()  # the job's first sample, pixel for pixel
