"""Full-recipe learning tests (minutes on 2 CPU cores): `make test-slow`."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("args,threshold", [
    ([], 2.3),                                        # the default CSE849 recipe: "a good model"
    (["experiment=states_rf"], 2.4),                  # rectified flow, Euler
    (["experiment=states_rf", "sampler=heun"], 2.4),  # rectified flow, Heun
])
def test_states_recipe_reaches_the_course_bar(args, threshold, tmp_path):
    proc = run_cli([*args, "callbacks.progress=null", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["protocol"]["n_samples"] == 5000
    assert res["metrics"]["nll"] < threshold
