"""Runs run.py's real entry point once per bad-input case, each in a forked child of one warm process.

One Python start and one import of torch/Lightning/Hydra for the whole table, instead of ~4 s per case:
the parent only imports (it runs no torch op, so forking is safe), each child sets sys.argv, runs
`run.py`'s __main__ path and reports its exit code and stderr; two children at a time (two cores).
Input: JSON list of {"id", "args"} on stdin; output: JSON list of {"id", "code", "stderr"} on stdout.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The heavy imports a task needs (torch, Lightning, the suite), once, before any fork.
import diffusion_lab.classifier  # noqa: E402, F401
import diffusion_lab.denoiser  # noqa: E402, F401
import diffusion_lab.tasks  # noqa: E402, F401


def start_case(args: list[str]) -> tuple[int, object]:
    """Fork a child that runs the CLI exactly as `python run.py <args>` does; its stderr goes to a temp file."""
    err = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(err.fileno(), 2)
            sys.argv = [str(REPO / "run.py"), *args]
            runpy.run_path(str(REPO / "run.py"), run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid, err


def main(parallel: int = 2) -> None:
    """Cases run `parallel` at a time (one per core); results in input order."""
    cases = json.load(sys.stdin)
    running: dict[int, tuple[int, object]] = {}
    out: dict[int, dict] = {}
    pending = list(enumerate(cases))
    while pending or running:
        while pending and len(running) < parallel:
            i, case = pending.pop(0)
            pid, err = start_case(case["args"])
            running[pid] = (i, err)
        pid, status = os.wait()
        i, err = running.pop(pid)
        err.seek(0)
        out[i] = {"id": cases[i]["id"], "code": os.waitstatus_to_exitcode(status),
                  "stderr": err.read().decode(errors="replace")}
        err.close()
    json.dump([out[i] for i in range(len(cases))], sys.stdout)


if __name__ == "__main__":
    main()
