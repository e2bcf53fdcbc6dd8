"""Packaging: the wheel ships the code, conf/ (as diffusion_lab/conf) and the sweeper plugin, and its `diffusion-lab`
console script runs an experiment from a directory outside the repo; `python -m diffusion_lab` and `python run.py`
are the same app (same one-line errors and exit codes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import CONF, FAST, REPO, run_cli

TINY = [*FAST, "trainer.max_steps=5", "eval.n_samples=100", "timesteps=20", "sampler.steps=10",
        "callbacks.checkpoint.every_n_train_steps=5", "trainer.limit_val_batches=0"]


def _console_scripts() -> dict:
    """pyproject.toml's [project.scripts]: what pip turns into commands."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **extra}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install .` of this checkout (a wheel, no dependencies) into a fresh target folder."""
    setuptools = pytest.importorskip("setuptools")
    if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.skip(f"setuptools {setuptools.__version__}: building a wheel without the `wheel` package needs >= 70.1")
    root = tmp_path_factory.mktemp("pkg")
    src = root / "src"  # a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    for name in ("pyproject.toml", "README.md", "conf", "diffusion_lab", "hydra_plugins"):
        _copy(REPO / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(root / "dist"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next((root / "dist").glob("diffusion_lab-*.whl"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                           "--target", str(root / "site"), str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _copy(path: Path, dest: Path) -> None:
    """Copy a source tree without caches (tracked files and new ones alike)."""
    if path.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(path.read_bytes())
        return
    for item in path.rglob("*"):
        if item.is_file() and "__pycache__" not in item.parts:
            _copy(item, dest / item.relative_to(path))


def test_wheel_ships_every_module_config_asset_and_the_console_script(installed):
    wheel = next((installed / "dist").glob("diffusion_lab-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(REPO)) for d in ("diffusion_lab", "hydra_plugins") for p in (REPO / d).rglob("*.py")}
    configs = {f"diffusion_lab/conf/{p.relative_to(CONF)}" for p in CONF.rglob("*.yaml")}
    assets = {str(p.relative_to(REPO)) for p in (REPO / "diffusion_lab" / "data" / "assets").glob("*.npz")}
    assert modules and configs and assets
    assert modules - names == set() and configs - names == set() and assets - names == set()
    scripts = _console_scripts()
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry).decode()
    assert "[console_scripts]" in text and f"diffusion-lab = {scripts['diffusion-lab']}" in text
    assert (installed / "site" / "bin" / "diffusion-lab").is_file()


def test_installed_console_script_runs_an_experiment_outside_the_repo(installed, tmp_path):
    """The `diffusion-lab` script pip wrote, with the installed package first on the path (the checkout is not on
    it, the working directory is a fresh folder): a tiny states run, its results.json and checkpoint in ./run."""
    work = tmp_path / "work"
    work.mkdir()
    site = installed / "site"
    proc = subprocess.run([sys.executable, str(site / "bin" / "diffusion-lab"), "experiment=states", *TINY,
                           "hydra.run.dir=run"], cwd=work, capture_output=True, text=True,
                          env=_env(PYTHONPATH=str(site)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((work / "run" / "results.json").read_text())
    assert res["protocol"]["step"] == 5 and res["protocol"]["n_samples"] == 100 and "nll" in res["metrics"]
    assert (work / "run" / "checkpoints" / "last.ckpt").is_file()
    # the package that ran is the installed copy, and its config tree is the one it ships
    probe = subprocess.run([sys.executable, "-c", "import diffusion_lab; print(diffusion_lab.__file__); "
                            "print(diffusion_lab.CONF_DIR)"], cwd=work, capture_output=True, text=True,
                           env=_env(PYTHONPATH=str(site)))
    module, conf = probe.stdout.split()
    assert Path(module).resolve().is_relative_to(site.resolve())
    assert Path(conf) == (site / "diffusion_lab" / "conf").resolve()


def test_every_entry_point_is_the_same_app(tmp_path):
    """python run.py, python -m diffusion_lab and the console script's function (pyproject's [project.scripts],
    called as pip's script calls it) give the same one-line errors and exit codes, from any directory."""
    target = _console_scripts()["diffusion-lab"]
    module, func = target.split(":")
    script = f"import sys; sys.argv[0] = 'diffusion-lab'; from {module} import {func}; sys.exit({func}())"
    env = _env(PYTHONPATH=str(REPO))  # this checkout's package, whatever the environment has installed
    for args, code, message in (
            (["experiment=nope"], 2, "error: experiment=nope: unknown choice; allowed: "),
            (["trainer.max_stepz=3"], 2, "error: trainer.max_stepz=3: no such key in the config"),
            (["trainer.max_steps=-3", f"hydra.run.dir={tmp_path / 'x'}"], 2, "error: trainer.max_steps=-3")):
        runs = [run_cli(args, cwd=tmp_path),
                subprocess.run([sys.executable, "-m", "diffusion_lab", *args], cwd=tmp_path, capture_output=True,
                               text=True, env=env),
                subprocess.run([sys.executable, "-c", script, *args], cwd=tmp_path, capture_output=True, text=True,
                               env=env)]
        for proc in runs:
            assert proc.returncode == code, proc.stderr[-2000:]
            assert proc.stderr.strip().startswith(message), proc.stderr[-2000:]
        assert len({proc.stderr for proc in runs}) == 1  # word for word
    assert not (tmp_path / "x").exists()  # refused before anything was written
