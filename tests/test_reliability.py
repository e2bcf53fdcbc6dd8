"""Reliability: every bad input of tests/bad_inputs.yaml is refused up front in one line (exit code 2),
naming the key or file, and leaves an existing run dir untouched.

The table runs through run.py's real entry point, in forked children of one warm process
(tests/bad_input_driver.py), so 140+ cases cost about a minute instead of 140 Python starts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, run_cli, write_autoencoder_ckpt

TABLE = yaml.safe_load((Path(__file__).parent / "bad_inputs.yaml").read_text())["cases"]
# The README's error examples ("$ python run.py <args>" then the printed line): run with the table, so the
# README never shows a message the program no longer prints.
README_ERRORS = [(shlex.split(cmd), err) for cmd, err in re.findall(
    r"^\$ python run\.py (.*)\n(error: .*)$", (REPO / "README.md").read_text(), flags=re.M)]
BASE = ["callbacks=minimal", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "logger=none", "trainer.max_steps=5", "eval.n_samples=10"]


def snapshot(root: Path) -> dict:
    """Every path under root with its size, mtime and content hash: 'nothing changed' means equal snapshots."""
    import hashlib

    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, digest)
    return out


def make_files(root: Path) -> dict[str, str]:
    """The placeholder files of the table: broken checkpoints, points files, data roots, run dirs."""
    f = {"tmp": str(root), "missing": str(root / "does" / "not" / "exist.pt")}
    (root / "empty.ckpt").write_bytes(b"")
    f["empty"] = str(root / "empty.ckpt")
    rng = np.random.default_rng(0)
    (root / "garbage.ckpt").write_bytes(rng.bytes(4096))
    f["garbage"] = str(root / "garbage.ckpt")
    (root / "garbage.pt").write_bytes(rng.bytes(4096))
    f["garbage_pt"] = str(root / "garbage.pt")
    torch.save({"weights": torch.ones(3)}, root / "nostate.ckpt")
    f["nostate"] = str(root / "nostate.ckpt")
    (root / "empty.npz").write_bytes(b"")
    f["empty_npz"] = str(root / "empty.npz")
    data = rng.normal(size=(100, 2)).astype(np.float32)
    labels = np.arange(100) % 5
    nan = data.copy()
    nan[17] = np.nan
    torch.save({"data": torch.from_numpy(nan), "labels": torch.from_numpy(labels)}, root / "nan.pt")
    f["nan_pt"] = str(root / "nan.pt")
    np.savetxt(root / "points.csv", data, delimiter=",")
    f["csv"] = str(root / "points.csv")
    np.savez(root / "dim3.npz", data=rng.normal(size=(100, 3)), labels=labels)
    f["dim3_npz"] = str(root / "dim3.npz")
    np.savez(root / "nokey.npz", x=data)
    f["nokey_npz"] = str(root / "nokey.npz")
    cifar = root / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
        (cifar / name).write_bytes(b"not a pickle at all")
    f["cifar_garbage"] = str(root / "cifar")
    f["mnist_root"] = os.environ.get("DIFFUSION_LAB_DATA", str(REPO.parent / "shared" / "data"))
    f["ae"] = str(write_autoencoder_ckpt(root / "ae.ckpt"))  # a 1x32x32 -> 4x8x8 KL-autoencoder
    f["lpips"] = os.environ.get("DIFFUSION_LAB_LPIPS", str(REPO.parent / "shared" / "data" / "weights" / "lpips"))
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("not a run")
    f["foreign"] = str(foreign)
    return f


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    files = make_files(root)
    # Fixture runs: a finished diffusion run (its dir and last.ckpt), a noisy and a clean classifier.
    run = root / "finished"
    runs = ([f"hydra.run.dir={run}"],
            ["experiment=states_classifier", f"hydra.run.dir={root / 'clf'}"],
            ["experiment=states_classifier", "task.noisy=false", f"hydra.run.dir={root / 'judge'}"])
    # three independent runs, side by side: each is mostly a Python start and imports (one core each)
    with ThreadPoolExecutor(len(runs)) as pool:
        for proc in pool.map(lambda args: run_cli([*BASE, *args]), runs):
            assert proc.returncode == 0, proc.stderr[-2000:]
    files |= {"run": str(run), "ckpt": str(run / "checkpoints" / "last.ckpt"),
              "clf": str(root / "clf" / "checkpoints" / "last.ckpt"),
              "judge": str(root / "judge" / "checkpoints" / "last.ckpt")}
    cases = [{"id": c["id"], "args": [*BASE, f"hydra.run.dir={root / 'runs' / c['id']}",
                                      *(a.format(**files) for a in c["args"])]} for c in TABLE]
    cases += [{"id": f"readme_{i}", "args": [*BASE, f"hydra.run.dir={root / 'runs' / f'readme_{i}'}", *args]}
              for i, (args, _) in enumerate(README_ERRORS)]
    before = {c["id"]: snapshot(Path(c["unchanged"].format(**files))) for c in TABLE if "unchanged" in c}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "bad_input_driver.py")], input=json.dumps(cases),
                          capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {r["id"]: r for r in json.loads(proc.stdout)}
    after = {c["id"]: snapshot(Path(c["unchanged"].format(**files))) for c in TABLE if "unchanged" in c}
    return out, before, after


@pytest.mark.parametrize("i", range(len(README_ERRORS)))
def test_readme_error_examples_are_the_messages_printed(results, i):
    out, _, _ = results
    args, documented = README_ERRORS[i]
    r = out[f"readme_{i}"]
    assert r["code"] == 2 and r["stderr"].strip() == documented, (args, r["stderr"][-2000:])


def test_readme_has_error_examples():
    assert len(README_ERRORS) >= 5  # the parser above still finds the README's block


def test_table_has_the_issue_categories():
    assert len(TABLE) >= 112 and len({c["id"] for c in TABLE}) == len(TABLE)


@pytest.mark.parametrize("case", TABLE, ids=[c["id"] for c in TABLE])
def test_bad_input_is_one_line_exit_2(results, case):
    out, before, after = results
    r = out[case["id"]]
    lines = [line for line in r["stderr"].splitlines() if line.strip()]
    assert r["code"] == 2 and len(lines) == 1, f"exit {r['code']}, stderr:\n{r['stderr'][-2500:]}"
    assert lines[0].startswith("error: ") and case["expect"] in lines[0], lines[0]
    if "unchanged" in case:
        assert before[case["id"]] == after[case["id"]], "the refused launch changed the existing run dir"
