"""Runs run.py's real entry point once per bad-input case, each in a forked child of one warm process.

One Python start and one import of torch/Lightning/Hydra for the whole table, instead of ~4 s per case:
the parent only imports (it runs no torch op, so forking is safe), each child sets sys.argv, runs
`run.py`'s __main__ path and reports its exit code and stderr. Input: JSON list of {"id", "args"} on stdin;
output: JSON list of {"id", "code", "stderr"} on stdout.
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


def run_case(args: list[str]) -> tuple[int, str]:
    with tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # child: the CLI exactly as `python run.py <args>` runs it
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
        _, status = os.waitpid(pid, 0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), err.read().decode(errors="replace")


def main() -> None:
    cases = json.load(sys.stdin)
    out = []
    for case in cases:
        code, stderr = run_case(case["args"])
        out.append({"id": case["id"], "code": code, "stderr": stderr})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
