"""logger=wandb|mlflow: Lightning's loggers as optional extras, offline by default; the run's own files
(results.json, report.md) do not depend on which logger ran."""

from __future__ import annotations

import importlib.util
import json

import pytest
from helpers import FAST, compose_cfg, run_cli

TINY = [*FAST, "experiment=states", "trainer.max_steps=20", "eval.n_samples=200", "timesteps=50",
        "sampler.steps=20"]
HAS = {name: importlib.util.find_spec(name) is not None for name in ("wandb", "mlflow")}


def test_logger_choices_are_lightnings_loggers_writing_under_the_run_dir(tmp_path):
    wandb = compose_cfg(["logger=wandb"], tmp_path).logger
    assert wandb._target_ == "lightning.pytorch.loggers.WandbLogger" and wandb.offline is True
    assert wandb.save_dir == str(tmp_path) and wandb.log_model is False  # offline cannot upload checkpoints
    mlflow = compose_cfg(["logger=mlflow"], tmp_path).logger
    assert mlflow._target_ == "lightning.pytorch.loggers.MLFlowLogger"
    # tracking_uri null: Lightning then uses file:<save_dir>, a file store in the run dir (no server, no env)
    assert mlflow.tracking_uri is None and mlflow.save_dir == str(tmp_path / "mlruns")


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_extra_is_one_line_before_any_work(name, tmp_path):
    if HAS[name]:
        pytest.skip(f"{name} is installed: the refusal cannot be shown here")
    proc = run_cli([*TINY, f"logger={name}", f"hydra.run.dir={tmp_path / 'run'}"])
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert f"logger={name}: the {name} package is not installed" in err[0] and f"'.[{name}]'" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("name, written", [("wandb", "wandb"), ("mlflow", "mlruns")])
def test_offline_logger_run_and_its_results_equal_the_tensorboard_runs(name, written, tmp_path):
    if not HAS[name]:
        pytest.skip(f"the optional extra {name} is not installed (pip install -e '.[{name}]')")
    runs = {}
    for logger in ("tensorboard", name):
        run = tmp_path / logger
        proc = run_cli([*TINY, f"logger={logger}", f"hydra.run.dir={run}"], env={"WANDB_MODE": "offline"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[logger] = json.loads((run / "results.json").read_text())
    assert (tmp_path / name / written).is_dir()  # the logger's own files, inside the run dir
    assert runs[name]["metrics"] == runs["tensorboard"]["metrics"]  # same seed, same numbers, any logger
    assert (tmp_path / name / "report.md").is_file()
