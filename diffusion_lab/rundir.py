"""A run directory belongs to one run: its identity (the resolved config), a lock while it is live, and
collision-free default names.

Claiming a dir happens before anything is written into it (Hydra's own `.hydra/` files and run.log are
written by us after the claim, see conf/config.yaml), so a refused launch leaves the dir byte-for-byte
as it was:
- a dir that holds a run (config.yaml) is re-entered only by the same resolved config: that resumes
  exactly (training continues from last.ckpt, or re-samples from the final checkpoint with the same seed);
  any other config stops in one line naming the keys that differ;
- a non-empty dir without config.yaml is not a diffusion_lab run and is refused;
- run.lock is flock'ed for the lifetime of the run, so a second live process is refused (the kernel drops
  the lock when a process dies, so a killed run never blocks its own resume).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.errors import RunError
from diffusion_lab.fileio import atomic_write_text

# Keys that say how a run executes, not what it computes: a resume may change them.
EXECUTION_KEYS = ("force", "auto_resume", "device_per_job", "eval.device", "eval.fidelity.cache_dir",
                  "eval.fidelity.batch_size", "allow_targets", "trainer.enable_progress_bar")
LOCK = "run.lock"
HASH = "config.sha256"


def identity(config: dict) -> dict:
    """The resolved config without the execution keys: what the run's results depend on."""
    config = json.loads(json.dumps(config, default=str))  # a deep copy with plain scalars
    for key in EXECUTION_KEYS:
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return config


def config_hash(config: dict) -> str:
    """sha256 of the identity, stored as config.sha256 beside results.json (sweeps skip on equality)."""
    return hashlib.sha256(json.dumps(identity(config), sort_keys=True).encode()).hexdigest()


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out |= _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out or {prefix: {}}
    return {prefix: node}


def differing_keys(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every leaf that differs between two identities."""
    a, b = _flatten(identity(old)), _flatten(identity(new))
    return [f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}" for k in sorted(set(a) | set(b))
            if a.get(k, "<absent>") != b.get(k, "<absent>")]


def stored_config(run_dir: Path) -> dict | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RunError(f"{path}: not a readable config ({str(exc).splitlines()[0]}); this dir is not reusable") \
            from exc


def check_owner(run_dir: Path, config: dict, key: str = "hydra.run.dir") -> bool:
    """Refuse (RunError) a dir that holds another run or foreign files; True when it holds this very run."""
    old = stored_config(run_dir)
    if old is None:
        # run.lock, error.txt and .hydra/ are what a launch refused before its claim may leave (a failed sweep
        # job's marker for the collector): not another run.
        leftovers = {LOCK, "error.txt", ".hydra"}
        foreign = [p.name for p in run_dir.iterdir() if p.name not in leftovers] if run_dir.is_dir() else []
        if foreign:
            raise RunError(f"{key}={run_dir}: not empty and not a diffusion_lab run (no config.yaml; holds "
                           f"{', '.join(sorted(foreign)[:4])}); choose another {key}")
        return False
    diffs = differing_keys(old, config)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise RunError(f"{key}={run_dir}: holds a run with a different config ({shown}); nothing was changed; "
                       f"choose another {key}")
    return True


def _rank_zero() -> bool:
    """Only the launching process claims the dir: DDP ranks > 0 (Lightning's launcher, SLURM, torchrun)
    join the run rank 0 owns."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


class RunLock:
    """flock(run.lock) for the lifetime of a run; pid written inside for the error message."""

    def __init__(self, run_dir: Path, key: str = "hydra.run.dir"):
        self.path, self.key, self.fd = run_dir / LOCK, key, None
        self.fresh = False  # the claim found no run in the dir (rollback() may then undo it)

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise RunError(f"{self.key}={self.path.parent}: in use by a live run (pid {pid}, {self.path}); "
                               f"choose another {self.key}") from None
            # The previous holder may have unlinked the file between our open and our flock: then we hold a
            # lock on a dead inode, so start again on the current file.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return
            os.close(fd)

    def rollback(self) -> None:
        """Undo a fresh claim whose run stopped on a config error before writing anything else (no
        checkpoint, no results): the dir is free again for the corrected command."""
        run_dir = self.path.parent
        mine = {LOCK, "config.yaml", HASH, ".hydra", "run.log", "error.txt"}
        if not self.fresh or any(p.name not in mine for p in run_dir.iterdir()):
            return
        for name in mine - {LOCK}:
            path = run_dir / name
            if path.is_dir():
                for child in path.iterdir():
                    child.unlink()
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
        self.release()
        try:
            run_dir.rmdir()
        except OSError:
            pass

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def claim(cfg: DictConfig, run_dir: Path, hydra_cfg=None, key: str = "hydra.run.dir") -> RunLock | None:
    """Check ownership, lock, then write config.yaml, config.sha256, .hydra/ and start run.log.

    Returns the held lock (release it when the run ends), or None in DDP ranks > 0.
    """
    if not _rank_zero():
        return None
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    check_owner(run_dir, config, key)  # read-only: a refusal changes nothing
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir, key)
    lock.acquire()
    try:
        # again under the lock: a racing launch may have written meanwhile
        lock.fresh = not check_owner(run_dir, config, key)
        _write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        _write(run_dir / HASH, config_hash(config) + "\n")
        if hydra_cfg is not None:
            # What Hydra writes with output_subdir=.hydra, written here after the claim instead.
            (run_dir / ".hydra").mkdir(exist_ok=True)
            _write(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))
            _write(run_dir / ".hydra" / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_cfg}))
            _write(run_dir / ".hydra" / "overrides.yaml", yaml.safe_dump(list(hydra_cfg.overrides.task)))
        _log_to_file(run_dir / "run.log")
    except BaseException:
        lock.release()
        raise
    return lock


def _write(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def _log_to_file(path: Path) -> None:
    """run.log with Hydra's file format (its job_logging file handler is replaced by this one, attached only
    once the dir is ours); Lightning's messages and warnings go there too (console.attach_run_log)."""
    from diffusion_lab.console import attach_run_log  # tqdm stays out of the early-error path

    attach_run_log(path)


_new_dirs: dict[str, str] = {}


def new_dir(base: str) -> str:
    """Resolver `dl_new_dir`: `base`, or `base_1`, `base_2`, ... created atomically with os.mkdir, so two
    launches in the same second (or on two machines sharing the file system) never get the same default
    dir. Cached per process: Hydra may resolve hydra.run.dir more than once."""
    if base not in _new_dirs:
        Path(base).parent.mkdir(parents=True, exist_ok=True)
        for i in range(10_000):
            candidate = base if i == 0 else f"{base}_{i}"
            try:
                os.mkdir(candidate)
            except FileExistsError:
                continue
            _new_dirs[base] = candidate
            break
        else:
            raise RunError(f"hydra.run.dir={base}: 10000 runs already use this name")
    return _new_dirs[base]
