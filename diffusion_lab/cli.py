"""Command-line glue for run.py: early one-line config errors and the task dispatcher."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion_lab.errors import ConfigError, RunError
from diffusion_lab.rundir import HASH, claim, config_hash
from diffusion_lab.safety import allow_user_targets
from diffusion_lab.validate import validate

log = logging.getLogger("diffusion_lab")


def _fail(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def check_group_choices(conf_dir: Path, argv: list[str]) -> None:
    """Reject `group=choice` overrides whose YAML does not exist, naming the allowed choices.

    Hydra refuses them too, but as a multi-line MissingConfigException ("In 'config': Could not find
    'objective/foo'", then "Available options in 'objective':" one per line, then the HYDRA_FULL_ERROR hint)
    after it has started; the suite's contract for bad input is one line and exit 2 before anything starts."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        group = conf_dir / key
        if "." in key or key.startswith("hydra") or not group.is_dir():
            continue
        allowed = sorted(p.stem for p in group.glob("*.yaml"))
        for choice in _choices(value):
            if choice not in allowed and choice != "null":
                _fail(f"{key}={choice}: unknown choice; allowed: {', '.join(allowed)}")


def check_composition(conf_dir: Path, argv: list[str]) -> None:
    """Compose the config once before Hydra does, so override errors are one line naming the override
    (Hydra's own report is a 4-6 line struct error). Sweeps are checked with each override's first value."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if not a.startswith("-") and "=" in a and not a.lstrip("+~").startswith("hydra")]
    parser = OverridesParser.create()
    first: list[str] = []
    for arg in args:
        try:
            override = parser.parse_override(arg)
        except Exception as exc:
            _fail(f"{arg}: not a valid override ({_first_line(exc)})")
        if override.is_sweep_override():
            try:
                value = next(iter(override.sweep_string_iterator()))
            except Exception:  # interval() sweeps have no first value to try
                continue
            arg = f"{override.get_key_element()}={value}"
        first.append(arg)
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            compose(config_name="config", overrides=first)
    except Exception as exc:
        _fail(_composition_error(exc, first))


def check_output_dirs(argv: list[str]) -> None:
    """hydra.run.dir / hydra.sweep.dir must be creatable and writable: Hydra creates them before any of our
    code runs, and its failure is a traceback. Probed with a temp dir in the nearest existing ancestor (the
    only reliable test: root ignores permission bits, read-only mounts and /proc do not)."""
    import tempfile

    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key not in ("hydra.run.dir", "hydra.sweep.dir") or not value or "$" in value:
            continue
        path = Path(value)
        ancestor = path
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            _fail(f"{key}={value}: {ancestor} is a file, not a directory")
        try:
            Path(tempfile.mkdtemp(dir=ancestor, prefix=".dl_probe_")).rmdir()
        except OSError as exc:
            _fail(f"{key}={value}: cannot create or write it under {ancestor} ({exc.strerror})")


def _first_line(exc: BaseException) -> str:
    return next(iter(str(exc).strip().splitlines()), type(exc).__name__)


def _composition_error(exc: BaseException, args: list[str]) -> str:
    text = f"{exc}\n{exc.__cause__ or ''}"
    match = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' is not in struct", text)
    if match:
        key = match.group(1)
        arg = next((a for a in args if a.lstrip("+~").split("=", 1)[0].endswith(key)), key)
        return (f"{arg}: no such key in the config (check the spelling with `python run.py --cfg job`; "
                f"to add a new key: +{arg.lstrip('+~')})")
    match = re.search(r"An item is already at '([^']+)'", text)
    if match:
        arg = next((a for a in args if match.group(1) in a), match.group(1))
        return f"{arg}: the key exists already; drop the '+' to override it"
    return f"{' '.join(args) or 'config'}: {_first_line(exc)}"


def _choices(value: str) -> list[str]:
    """Choices in an override value: `a`, sweeps `a,b`, `choice(a,b)`."""
    value = value.strip()
    if value.startswith(("choice(", "range(", "glob(", "interval(")):
        value = value[value.index("(") + 1: -1]
    return [v.strip().strip("'\"") for v in value.split(",") if v.strip()]


def _verbose(hc=None) -> bool:
    """Full tracebacks only on request: DIFFUSION_LAB_TRACEBACK=1 or hydra.verbose=true."""
    if os.environ.get("DIFFUSION_LAB_TRACEBACK", "") not in ("", "0"):
        return True
    return bool(hc is not None and hc.verbose)


def run_task(cfg: DictConfig):
    """Validate, claim the run dir, dispatch to cfg.task; one-line errors (exit 2) in single runs, a failed
    job in sweeps.

    Order matters for "nothing saved is changed by a refused launch": all config values are validated, then
    the run dir is claimed (ownership check, lock; see rundir.py), and only then is anything written.
    In a multirun: a job whose results.json exists with the same config hash is skipped (force=true re-runs
    it), a failing job leaves error.txt for the collector, each job gets its own GPU on multi-GPU machines
    (device_per_job), and Lightning's DDP launcher re-runs only this job in this job's directory.
    """
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    lock = None
    environ = dict(os.environ)
    try:
        from diffusion_lab.console import detach_run_log, quiet_libraries

        detach_run_log()  # a sweep's previous job: its run.log is closed before this job logs anything
        quiet_libraries()
        allow_user_targets(cfg.get("allow_targets"))
        validate(cfg)
        if multirun:
            _single_job_argv(hc)
            if cfg.get("device_per_job", True):
                assign_job_device(cfg, int(hc.job.num))
            done = _finished(cfg, run_dir)  # after the device assignment: the hash is of the config as run
            if done is not None:
                log.info("skipping %s: finished with this config (force=true re-runs it)", run_dir)
                return _sweep_value(cfg, done)
        try:
            lock = claim(cfg, run_dir, hc, key)
        except PermissionError as exc:
            raise ConfigError(f"{key}={run_dir}: cannot write there ({exc.strerror})") from exc
        task = instantiate(cfg.task)
        results = task(cfg, run_dir)
    except (Exception, KeyboardInterrupt) as exc:
        if lock is not None:  # the run dir is this run's: its traceback goes to run.log, the console gets one line
            from diffusion_lab.console import log_failure

            log_failure(exc)
        if lock is not None and isinstance(exc, ConfigError):
            lock.rollback()  # a fresh dir whose run stopped on bad input is left as it was found
            lock = None if lock.fd is None else lock
        ours = lock is not None or not (run_dir / "config.yaml").exists()
        if lock is None and ours:  # refused before the claim: leave no empty dir behind
            _remove_if_empty(run_dir)
        if multirun:
            if ours and not isinstance(exc, KeyboardInterrupt):
                _mark_failed(run_dir, hc, exc)
            raise
        if isinstance(exc, (ConfigError, RunError)):
            if _verbose(hc):
                traceback.print_exc()
            _fail(str(exc))
        if isinstance(exc, KeyboardInterrupt):
            _fail("interrupted (the run dir resumes from its last checkpoint when launched again)", 130)
        if _verbose(hc):
            traceback.print_exc()
        first = next(iter(str(exc).strip().splitlines()), "")
        _fail(f"{type(exc).__name__}: {first} (set DIFFUSION_LAB_TRACEBACK=1 or hydra.verbose=true for the "
              "traceback)", 1)
    finally:
        if lock is not None:
            lock.release()
        if multirun:
            _end_distributed(environ)
    (run_dir / "error.txt").unlink(missing_ok=True)
    metrics = results.get("metrics", {})
    if metrics and (run_dir / "results.json").is_file():
        log_hparams(run_dir, list(hc.overrides.task), results)
    log.info("results: %s -> %s", {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)},
             run_dir / "results.json")
    print(f"results.json: {run_dir / 'results.json'}")
    for key, value in metrics.items():
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    spent = results.get("protocol", {}).get("compute")
    if spent:
        from diffusion_lab.compute import summary_line  # torch stays out of the early-error path

        print(f"  compute: {summary_line(spent)}")
    return _sweep_value(cfg, metrics)


def _finished(cfg: DictConfig, run_dir: Path) -> dict | None:
    """A sweep job's metrics when it already finished with this very config (its config.sha256 matches);
    a results.json from another config is never reported as this job's (the claim then refuses the dir)."""
    done = run_dir / "results.json"
    if cfg.get("force", False) or not done.is_file():
        return None
    stored = run_dir / HASH
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    if not stored.is_file() or stored.read_text().strip() != config_hash(config):
        return None
    return json.loads(done.read_text()).get("metrics", {})


def _mark_failed(run_dir: Path, hc, exc: BaseException) -> None:
    """error.txt (+ .hydra/overrides.yaml, so the collector lists the job) in a failed sweep job's own dir."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if not overrides.exists():
        overrides.write_text(yaml.safe_dump(list(hc.overrides.task)))
    (run_dir / "error.txt").write_text(f"{type(exc).__name__}: {exc}\n")


def _remove_if_empty(run_dir: Path) -> None:
    try:
        run_dir.rmdir()
    except OSError:
        pass


def log_hparams(run_dir: Path, overrides: list[str], results: dict) -> None:
    """The job's overrides and key protocol fields + its scalar metrics in TensorBoard's HPARAMS view, so
    `tensorboard --logdir multirun/...` compares sweep jobs side by side. Written into <run_dir>/tensorboard, the
    training logger's own folder: a subfolder would be listed by TensorBoard as a second run of every job."""
    from torch.utils.tensorboard import SummaryWriter

    proto = results.get("protocol", {})
    hparams = {k.lstrip("+~"): v for k, _, v in (o.partition("=") for o in overrides)}
    for key in ("sampler", "steps", "eta", "guidance", "guidance_scale", "seed"):
        if isinstance(proto.get(key), (int, float, str, bool)):
            hparams.setdefault(key, proto[key])
    if isinstance(proto.get("objective"), dict):
        hparams.setdefault("objective", proto["objective"].get("name"))
    metrics = {f"hparams/{k}": float(v) for k, v in results["metrics"].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        writer.add_hparams(hparams, metrics, run_name=".")


def _sweep_value(cfg: DictConfig, metrics: dict):
    metric = cfg.get("sweep_metric")
    return metrics.get(metric) if metric else None


def _end_distributed(environ: dict) -> None:
    """After a DDP job in a multirun: drop its process group and the rank variables Lightning's launcher
    put in os.environ, so the next job in this process launches its own ranks instead of reusing dead ones."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key in set(os.environ) - set(environ):
        del os.environ[key]
    os.environ.update(environ)


def _single_job_argv(hc) -> None:
    """Make Lightning's DDP subprocess launcher start *this job* in *this job's* directory.

    It re-executes `sys.argv` with `hydra.run.dir=<hydra.run.dir>` appended: in a multirun that would
    re-run the whole sweep (`-m`, all values) in a fresh timestamped directory. We hand it the job's
    own overrides and point hydra.run.dir at the job's output dir, so the other ranks join this job.
    """
    sys.argv = [sys.argv[0], *hc.overrides.task]
    node = HydraConfig.get()
    OmegaConf.set_readonly(node, False)
    with open_dict(node):
        node.run.dir = hc.runtime.output_dir
    OmegaConf.set_readonly(node, True)


def assign_job_device(cfg: DictConfig, job_num: int) -> str | None:
    """Job n of a sweep on a machine with k > 1 GPUs uses GPU n % k (trainer and evaluation), so parallel
    launchers (joblib: n_jobs = k) run k jobs at once, one per GPU. DDP jobs (several devices) keep theirs."""
    import torch

    count = torch.cuda.device_count()  # 0 without CUDA
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    if count < 2 or devices not in (1, "1"):
        return None
    gpu = job_num % count
    with open_dict(cfg):
        if "trainer" in cfg:
            cfg.trainer.devices = [gpu]
            cfg.trainer.accelerator = "gpu"
        cfg.eval.device = f"cuda:{gpu}"
    log.info("job %d -> cuda:%d (of %d GPUs)", job_num, gpu, count)
    return f"cuda:{gpu}"
