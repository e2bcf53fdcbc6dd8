"""Command-line glue for run.py: early one-line config errors and the task dispatcher."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion_lab.build import ConfigError

log = logging.getLogger("diffusion_lab")


def _fail(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def check_group_choices(conf_dir: Path, argv: list[str]) -> None:
    """Reject `group=choice` overrides whose YAML does not exist, naming the allowed choices."""
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


def _choices(value: str) -> list[str]:
    """Choices in an override value: `a`, sweeps `a,b`, `choice(a,b)`."""
    value = value.strip()
    if value.startswith(("choice(", "range(", "glob(", "interval(")):
        value = value[value.index("(") + 1: -1]
    return [v.strip().strip("'\"") for v in value.split(",") if v.strip()]


def run_task(cfg: DictConfig):
    """Dispatch to cfg.task; config errors end as one line (exit 2) in single runs, a failed job in sweeps.

    In a multirun: a job whose results.json exists is skipped (force=true re-runs it), a failing job
    leaves error.txt for the collector, each job gets its own GPU on multi-GPU machines
    (device_per_job), and Lightning's DDP launcher re-runs only this job in this job's directory.
    """
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    if multirun:
        done = run_dir / "results.json"
        if done.is_file() and not cfg.get("force", False):
            log.info("skipping %s: results.json exists (force=true re-runs it)", run_dir)
            return _sweep_value(cfg, json.loads(done.read_text()).get("metrics", {}))
        _single_job_argv(hc)
        if cfg.get("device_per_job", True):
            assign_job_device(cfg, int(hc.job.num))
    environ = dict(os.environ)
    try:
        task = instantiate(cfg.task)
        results = task(cfg, run_dir)
    except Exception as exc:
        if multirun:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
            raise
        if isinstance(exc, ConfigError):
            _fail(str(exc))
        raise
    finally:
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
    return _sweep_value(cfg, metrics)


def log_hparams(run_dir: Path, overrides: list[str], results: dict) -> None:
    """The job's overrides and key protocol fields + its scalar metrics in TensorBoard's HPARAMS view
    (<run_dir>/tensorboard/hparams), so `tensorboard --logdir multirun/...` compares sweep jobs side by side."""
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
    with SummaryWriter(str(run_dir / "tensorboard" / "hparams")) as writer:
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
