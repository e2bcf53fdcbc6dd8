"""Files are data, never code: crafted checkpoints and dataset files must not make the program call anything.

Each attack plants a stored config (or a pickle) that would create a canary file if it ever ran; it goes in
through every door that reads a checkpoint (task=sample, guidance.ckpt, eval.judge, ckpt_path resume) or
a dataset (CIFAR-10 batches). Asserted: exit code 2, one line naming the refused target, no canary.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_cli

BASE = ["callbacks=minimal", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "logger=none", "trainer.max_steps=5", "eval.n_samples=10"]


class _Touch:
    """A pickle payload: unpickling it calls os.system (creates the canary)."""

    def __init__(self, canary: Path):
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def payloads(canary: Path, evil_pickle: Path) -> dict[str, dict]:
    """Stored-config nodes that would each create `canary` when instantiated."""
    return {
        "numpy.savetxt": {"_target_": "numpy.savetxt", "fname": str(canary), "X": [[1.0]]},
        "builtins.open": {"_target_": "builtins.open", "file": str(canary), "mode": "w"},
        "os.system": {"_target_": "os.system", "_args_": [f"touch {canary}"]},
        "subprocess.Popen": {"_target_": "subprocess.Popen", "args": ["touch", str(canary)]},
        "torch.load": {"_target_": "torch.load", "f": str(evil_pickle), "weights_only": False},
    }


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    runs = {"model": [f"hydra.run.dir={root / 'model'}"],
            "clf": ["experiment=states_classifier", f"hydra.run.dir={root / 'clf'}"]}
    for args in runs.values():
        proc = run_cli([*BASE, *args])
        assert proc.returncode == 0, proc.stderr[-2000:]
    canary = root / "canary"
    evil_pickle = root / "evil.pkl"
    evil_pickle.write_bytes(pickle.dumps(_Touch(canary)))
    files = {}
    for name, node in payloads(canary, evil_pickle).items():
        for kind, node_key in (("model", "data"), ("clf", "classifier")):
            ckpt = torch.load(root / kind / "checkpoints" / "last.ckpt", weights_only=True)
            ckpt["config"][node_key] = node
            path = root / f"{kind}_{name}.ckpt"
            torch.save(ckpt, path)
            files[kind, name] = path
    return root, canary, files


DOORS = {
    "task=sample": lambda f: ["task=sample", f"ckpt={f['model']}"],
    "ckpt_path": lambda f: [f"ckpt_path={f['model']}"],
    "guidance.ckpt": lambda f: ["guidance=classifier", f"guidance.ckpt={f['clf']}"],
    "eval.judge": lambda f: ["experiment=states_cfg", "eval.classes=all", f"eval.judge={f['clf']}"],
}
TARGETS = ["numpy.savetxt", "builtins.open", "os.system", "subprocess.Popen", "torch.load"]


def test_crafted_checkpoints_never_run_code(planted):
    root, canary, files = planted
    cases = []
    for door, args in DOORS.items():
        for target in TARGETS:
            f = {"model": files["model", target], "clf": files["clf", target]}
            cases.append({"id": f"{door}/{target}", "target": target,
                          "args": [*BASE, f"hydra.run.dir={root / 'runs' / str(len(cases))}", *args(f)]})
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "bad_input_driver.py")], input=json.dumps(cases),
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    assert not canary.exists(), "a crafted checkpoint ran code"
    assert len(results) == len(DOORS) * len(TARGETS) == 20
    for case, r in zip(cases, results):
        lines = r["stderr"].strip().splitlines()
        assert r["code"] == 2 and len(lines) == 1, (case["id"], r["stderr"][-2000:])
        assert f"_target_={case['target']}" in lines[0] and "refused" in lines[0], (case["id"], lines[0])


def test_interpolations_in_stored_configs_are_refused(planted, tmp_path):
    from diffusion_lab.build import ConfigError, load_checkpoint

    root, _, _ = planted
    ckpt = torch.load(root / "model" / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["config"]["data"]["path"] = "${oc.env:HOME}"  # resolvers read the environment
    torch.save(ckpt, tmp_path / "interp.ckpt")
    with pytest.raises(ConfigError, match=r"data\.path=.*interpolation"):
        load_checkpoint(tmp_path / "interp.ckpt")


def test_user_allowed_targets_extend_the_list(planted):
    """allow_targets (from the trusted command line) admits a user's own class; nothing else changes."""
    from diffusion_lab import safety

    root, _, files = planted
    ckpt = torch.load(files["model", "numpy.savetxt"], weights_only=True)
    with pytest.raises(safety.UnsafeFileError, match="numpy.savetxt"):
        safety.check_stored_config(ckpt["config"], "x")
    safety.allow_user_targets(["numpy.savetxt"])
    try:
        safety.check_stored_config(ckpt["config"], "x")
    finally:
        safety.allow_user_targets([])
    assert "diffusion_lab.tasks.write_json" not in safety.allowed_targets()  # importable, never allowed


def test_every_conf_target_is_allowed_and_nothing_else():
    from diffusion_lab.safety import allowed_targets, conf_targets

    # a checkpoint written before the final-step Checkpoint callback existed names Lightning's own
    assert "lightning.pytorch.callbacks.ModelCheckpoint" in allowed_targets()
    targets = conf_targets()
    assert "diffusion_lab.nets.MLP" in targets and "torch.optim.AdamW" in targets
    assert all(t.startswith(("diffusion_lab.", "lightning.", "torch.optim.", "hydra_plugins.")) for t in targets), \
        sorted(targets)


def test_malicious_cifar_batch_never_runs_code(tmp_path):
    canary = tmp_path / "canary"
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
        (folder / name).write_bytes(pickle.dumps({b"data": _Touch(canary), b"labels": [0]}, protocol=4))
    from diffusion_lab.data.images import _unpickle
    from diffusion_lab.safety import UnsafeFileError

    with pytest.raises(UnsafeFileError, match=r"data_batch_1: refused pickle global (posix|os)\.system"):
        _unpickle(folder / "data_batch_1")
    proc = run_cli([*BASE, "data=cifar10", "model=unet_tiny", f"data.root={tmp_path / 'data'}",
                    "data.download=false", f"hydra.run.dir={tmp_path / 'run'}"])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "refused pickle global" in lines[0], proc.stderr[-2000:]
    assert not canary.exists()
