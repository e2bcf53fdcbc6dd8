"""Tasks (task=train|sample|evaluate): each writes results.json = {"metrics", "protocol"} in its run dir."""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_lab import compute, plots
from diffusion_lab.build import (
    ConfigError,
    build,
    build_trainer,
    check_sampler,
    load_checkpoint,
    make,
    make_guidance,
    restore,
    sample_precision,
)
from diffusion_lab.callbacks import EMA
from diffusion_lab.console import progress
from diffusion_lab.evaluation import check_eval_inputs, check_judge, judge_metrics
from diffusion_lab.fileio import atomic_write_text
from diffusion_lab.guidance import ClassifierGuidance, requested_labels
from diffusion_lab.guidance import describe as guidance_describe
from diffusion_lab.preflight import (
    check_classes,
    check_fit,
    check_space,
    check_weights,
    clean_orphans,
    prepare_space,
    setup_data,
)
from diffusion_lab.report import history, read_scalars, sampling_facts, training_facts, write_report
from diffusion_lab.samplers import nfe, sampler_name

log = logging.getLogger("diffusion_lab")


def write_json(path: Path, obj: dict) -> None:
    """Atomic JSON write (temp file + rename): a crash never leaves a truncated results.json."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sampler_protocol(sampler, module) -> dict:
    kw = dict(getattr(sampler, "keywords", {}))
    return {"sampler": sampler_name(sampler), **kw, "nfe": nfe(sampler, kw.get("steps", 0)),
            "objective": module.objective.describe(), "schedule": module.objective.schedule.describe()}


def generate_and_evaluate(module, datamodule, cfg: DictConfig, run_dir: Path, protocol: dict,
                          sampler=None, wall_start: float | None = None, guidance=None) -> dict:
    """Draw cfg.eval.n_samples (per requested class) with a seeded generator, save them, compute metrics
    and plots, write results.json."""
    ev = cfg.eval
    sampler = sampler or module.sampler
    guidance = guidance if guidance is not None else module.guidance
    names = list(getattr(datamodule, "class_names", None) or [])
    n = int(ev.n_samples)
    try:
        labels, groups = requested_labels(ev.get("classes"), names, n, bool(ev.get("unconditional", False)))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if labels is not None and not module.num_classes and not isinstance(guidance, ClassifierGuidance):
        raise ConfigError(f"eval.classes={ev.classes}: the model is unconditional (model.num_classes=0); class "
                          "requests need a class-conditional model or guidance=classifier guidance.ckpt=<ckpt>")
    check_eval_inputs(ev)  # before sampling: a typo must not cost a whole generation
    n_total = n if labels is None else len(labels)
    batch = ev.get("batch_size") or n_total
    steps = int(dict(getattr(sampler, "keywords", {})).get("steps", 1) or 1)
    frames = datamodule.domain.frames(steps, min(batch, n_total), module.space.decode)
    t0 = time.perf_counter()
    share = -(-n_total // (module.trainer.world_size if module._trainer is not None else 1))
    batches = -(-share // batch)  # this rank's sampling batches
    if module.is_rank_zero:
        log.info("sampling %d with %s: %d steps x %d batch(es) of <= %d", n_total, sampler_name(sampler), steps,
                 batches, batch)
    bar = progress(steps * batches, f"sampling {n_total}", unit="step", enabled=None if module.is_rank_zero else False)

    def step(i, t, x):
        bar.update(1)
        if frames is not None:
            frames(i, t, x)

    # Under DDP every rank draws its share and the samples are gathered once; rank 0 scores and writes.
    with bar:
        samples = module.sample_sharded(n_total, int(ev.seed), cond=labels, sampler=sampler, batch_size=batch,
                                        callback=step, guidance=guidance).float().cpu()
    sample_time = time.perf_counter() - t0
    if not module.is_rank_zero:
        return {"metrics": {}}
    torch.save({"samples": samples, "labels": labels}, run_dir / "samples.pt")
    np.savez(run_dir / "samples.npz", samples=samples.numpy(),
             **({} if labels is None else {"labels": labels.numpy()}))
    metrics, extra_protocol = datamodule.domain.evaluate(
        datamodule, samples, run_dir, cfg, module.device, labels=labels, per_class=n,
        frames=frames.frames if frames else None, title=protocol.get("title", ""))
    if ev.get("judge"):
        judged, judge_protocol = judge_metrics(samples, labels, ev.judge, names, datamodule)
        metrics |= judged
        extra_protocol |= judge_protocol
    sampling = _sampler_protocol(sampler, module)
    spent = compute.sampling(module, sampling["nfe"], n_total, guidance, labelled=labels is not None)
    protocol = {**protocol, "backbone": type(module.net).__name__, "space": module.space.describe(), **sampling,
                **guidance_describe(guidance), **extra_protocol,
                "compute": {**protocol.get("compute", {}), **spent},
                "classes": groups or None, "n_samples": n_total,
                **({"n_per_class": n} if labels is not None else {}),
                "sample_seed": int(ev.seed), "sample_precision": module.sample_precision or "fp32",
                "sampling_seconds": round(sample_time, 3), "device": _device_name(module.device)}
    if wall_start is not None:
        protocol["wall_seconds"] = round(time.perf_counter() - wall_start, 2)
    results = {"metrics": metrics, "protocol": protocol}
    write_json(run_dir / "results.json", results)
    return results


def _save_resolved_config(cfg: DictConfig, run_dir: Path) -> None:
    """config.yaml, written atomically (DDP ranks may write the same file at the same time)."""
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def _resume_path(cfg: DictConfig, run_dir: Path, module=None) -> str | None:
    """Explicit ckpt_path, else the run dir's own last.ckpt (automatic resume after a crash).

    An explicit checkpoint is read first (allow-listed config) and must hold this model's weights; the run
    dir's own last.ckpt belongs to this very config (rundir.claim checked config.yaml)."""
    if cfg.get("ckpt_path"):
        ckpt = load_checkpoint(cfg.ckpt_path, key="ckpt_path")  # validated before Lightning reads it
        if module is not None:
            check_weights(ckpt["state_dict"], module.state_dict(), f"ckpt_path={cfg.ckpt_path}")
        return str(cfg.ckpt_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    return str(last) if last.is_file() and cfg.get("auto_resume", True) else None


def fit(cfg: DictConfig, run_dir: Path):
    """Seed, build, check everything a run reads later, save the resolved config, fit (resuming when a
    checkpoint exists), plot the loss curve."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    parts = build(cfg)
    setup_data(cfg, parts.datamodule)
    check_space(cfg, parts)
    resume = _resume_path(cfg, run_dir, parts.module)
    prepare_space(cfg, parts, resume)
    check_fit(cfg, parts)
    check_classes(cfg, parts.datamodule, parts.module)
    if cfg.get("eval") is not None:
        check_judge(cfg.eval, tuple(parts.datamodule.shape))
    _save_resolved_config(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir)
    if trainer.is_global_zero:
        clean_orphans(run_dir)  # the run dir is ours (claimed and locked): no live writer owns these
    t0 = time.perf_counter()
    trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=resume)
    seconds = time.perf_counter() - t0
    for callback in trainer.callbacks:
        if isinstance(callback, EMA):
            callback.use_average(parts.module)
    if trainer.is_global_zero:
        _save_loss_curve(run_dir, trainer)
    return parts, trainer, seconds


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Fit, then sample with EMA weights, evaluate and plot."""
    t0 = time.perf_counter()
    check_eval_inputs(cfg.eval)  # a bad eval setting must fail before training, not after it (fit checks classes)
    if cfg.eval.get("classes") is not None and not OmegaConf.select(cfg, "data.num_classes", default=0):
        raise ConfigError(f"eval.classes={cfg.eval.classes}: the data are unconditional (data.num_classes=0)")
    parts, trainer, train_seconds = fit(cfg, run_dir)
    uses_ema = any(isinstance(c, EMA) for c in trainer.callbacks)
    last = run_dir / "checkpoints" / "last.ckpt"
    spent = train_compute(parts.module, trainer)
    protocol = {"task": "train", "checkpoint": str(last), "step": trainer.global_step, "ema": uses_ema,
                "world_size": trainer.world_size,
                "seed": int(cfg.seed), "train_seconds": round(train_seconds, 2), "title": cfg.get("name", ""),
                **parts.datamodule.domain.protocol(parts.datamodule), "compute": spent}
    results = generate_and_evaluate(parts.module, parts.datamodule, cfg, run_dir, protocol, wall_start=t0)
    if not trainer.is_global_zero:  # DDP: the other ranks drew their share of the samples; rank 0 writes
        return results
    _log_final(trainer, results, run_dir)
    facts = training_facts(trainer, parts.module.net, int(cfg.data.batch_size), train_seconds, run_dir,
                           results["protocol"]["compute"])
    write_report(run_dir, f"{cfg.get('name', 'run')}: training report", facts, results,
                 {"Loss curve": "loss_curve.png", "Samples (EMA weights)": "samples.png",
                  "Samples per class": "samples_per_class.png", "Denoising trajectory": "trajectory.png"})
    return results


def train_compute(module, trainer) -> dict:
    """protocol["compute"] of a finished fit: parameters, FLOPs per forward, samples seen (the module's ledger,
    over every launch of the run), training FLOPs and device-hours."""
    devices, _, accelerator = compute.trainer_scale(trainer)
    return compute.training(module.net, compute.module_forward_flops(module), trainer.global_step,
                            module.ledger.samples(trainer.world_size), module.ledger.seconds(), devices, accelerator)


def _save_loss_curve(run_dir: Path, trainer=None) -> None:
    """Plot train/loss from the fit's in-process History (every launch, any logger; else the TensorBoard events)
    and val/loss when a validation loop logged it to TensorBoard."""
    record = history(trainer) if trainer is not None else None
    steps, losses = (record.steps, record.loss) if record is not None and record.steps else \
        read_scalars(run_dir, "train/loss")
    if steps:
        fig = plots.plot_loss_curve(steps, losses, title="train/loss", val=read_scalars(run_dir, "val/loss"))
        plots.save_figure(fig, run_dir / "loss_curve.png")


def _log_final(trainer, results: dict, run_dir: Path) -> None:
    logger = trainer.logger
    if logger is None or not hasattr(logger.experiment, "add_scalar"):
        return
    for key, value in results["metrics"].items():
        logger.experiment.add_scalar(f"eval/{key}", value, trainer.global_step)
    from matplotlib.image import imread

    for name, tag in (("samples.png", "samples/final"), ("trajectory.png", "samples/trajectory")):
        if (run_dir / name).is_file():
            img = imread(run_dir / name)[..., :3]
            logger.experiment.add_image(tag, (img * 255).astype("uint8"), trainer.global_step, dataformats="HWC")
    logger.experiment.flush()


def eval_device(cfg: DictConfig) -> torch.device:
    """cfg.eval.device: auto = the first CUDA device when there is one, else the CPU."""
    name = str(cfg.eval.get("device", "auto"))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"eval.device={name}: expected auto, cpu, cuda or cuda:N") from exc


def _restore(cfg: DictConfig) -> tuple:
    """Checkpoint + its saved config -> (module with weights, datamodule, saved cfg, ckpt, used_ema)."""
    if not cfg.get("ckpt"):
        raise ConfigError("ckpt=null: task=sample/evaluate needs ckpt=<path to a .ckpt>")
    return restore(cfg.ckpt, bool(cfg.eval.use_ema))


def _sampler_override(cfg: DictConfig, saved: DictConfig, schedule, overrides: list[str] | None = None):
    """The sampler asked for on this command line (or by the experiment, sampler_source=config), else the
    one the model was trained with; `overrides`: a sweep job's, checked before it launches."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.get("sampler_source", "auto") not in ("auto", "config"):
        raise ConfigError(f"sampler_source={cfg.sampler_source}: expected auto or config")
    if overrides is None:
        overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    asked = cfg.get("sampler_source") == "config" or any(o.lstrip("+~").startswith("sampler") for o in overrides)
    sampler = make(cfg if asked else saved, "sampler")
    check_sampler(sampler, schedule)
    return sampler


def sample(cfg: DictConfig, run_dir: Path, task_name: str = "sample") -> dict:
    """Reload a checkpoint with its saved config and draw cfg.eval.n_samples with any sampler and guidance
    (cfg.guidance when set, else the checkpoint's own)."""
    t0 = time.perf_counter()
    check_eval_inputs(cfg.eval)
    return sample_restored(cfg, run_dir, *_restore(cfg), task_name=task_name, wall_start=t0)


def sample_restored(cfg: DictConfig, run_dir: Path, parts, saved: DictConfig, ckpt: dict, used_ema: bool,
                    task_name: str = "sample", wall_start: float | None = None) -> dict:
    """task=sample on a model that build.restore brought back (diffusion_lab.api evaluates through this too)."""
    module = parts.module.to(eval_device(cfg))
    _save_resolved_config(cfg, run_dir)
    sampler = _sampler_override(cfg, saved, module.objective.schedule)
    if cfg.get("guidance") is not None:
        module.guidance = make_guidance(cfg, module.net, module.objective.schedule, module.space)
    if str(cfg.eval.get("precision", "auto")) != "auto":
        module.sample_precision = sample_precision(cfg)
    protocol = {"task": task_name, "checkpoint": str(cfg.ckpt), "step": ckpt.get("global_step"), "ema": used_ema,
                "seed": int(cfg.seed), "title": cfg.get("name") or saved.get("name", ""),
                **parts.datamodule.domain.protocol(parts.datamodule),
                "compute": _checkpoint_compute(module, ckpt, saved)}
    setup_data(saved, parts.datamodule)
    check_judge(cfg.eval, tuple(parts.datamodule.shape))
    results = generate_and_evaluate(module, parts.datamodule, cfg, run_dir, protocol, sampler=sampler,
                                    wall_start=wall_start)
    if not module.is_rank_zero:
        return results
    # the checkpoint's training settings; how this run sampled is in the facts (sampler, steps, guidance, n)
    trained = {k: v for k, v in OmegaConf.to_container(saved, resolve=True).items()
               if k not in ("sampler", "guidance", "eval", "seed")}
    write_report(run_dir, f"{protocol['title'] or 'run'}: {task_name} report", sampling_facts(results["protocol"]),
                 results, {"Samples": "samples.png", "Samples per class": "samples_per_class.png",
                           "Denoising trajectory": "trajectory.png"}, config=trained, section="Sampling",
                 params_title="Training hyperparameters (of the checkpoint)")
    return results


def _checkpoint_compute(module, ckpt: dict, saved: DictConfig) -> dict:
    """The training half of protocol["compute"] for a checkpoint: what it recorded (samples seen, training time
    over all its launches), else (checkpoints older than the record) global_step x the saved config's batch x
    gradient accumulation x devices, marked as an estimate."""
    step = int(ckpt.get("global_step") or 0)
    record = ckpt.get("compute")
    forward = compute.module_forward_flops(module)
    if record:
        return compute.training(module.net, forward, step, record["samples_seen"], record.get("train_seconds"),
                                int(record.get("devices", 1)), record.get("accelerator"))
    devices = OmegaConf.select(saved, "trainer.devices", default=1)
    devices = len(devices) if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices) else devices
    devices = (devices if isinstance(devices, int) else 1) * int(OmegaConf.select(saved, "trainer.num_nodes",
                                                                                   default=1) or 1)
    batch = int(OmegaConf.select(saved, "data.batch_size", default=0) or 0)
    accumulate = int(OmegaConf.select(saved, "trainer.accumulate_grad_batches", default=1) or 1)
    return {**compute.training(module.net, forward, step, step * batch * accumulate * devices),
            "samples_seen_source": "estimate: global_step x data.batch_size x accumulate_grad_batches x devices"}


def read_samples(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(samples, labels or None) from a samples.pt ({"samples", "labels"}) or samples.npz written by a run."""
    try:
        if path.suffix == ".pt":
            blob = torch.load(path, weights_only=True)
            samples, labels = blob["samples"], blob.get("labels")
        else:
            with np.load(path) as npz:
                samples = torch.from_numpy(npz["samples"])
                labels = torch.from_numpy(npz["labels"]) if "labels" in npz.files else None
    except Exception as exc:
        raise ConfigError(f"samples={path}: cannot be read as a samples file with a 'samples' array "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") from exc
    if labels is not None and len(labels) != len(samples):
        raise ConfigError(f"samples={path}: {len(samples)} samples but {len(labels)} labels")
    return samples, labels


def evaluate(cfg: DictConfig, run_dir: Path) -> dict:
    """Metrics for a sample file (samples=<.pt/.npz>) or, like `sample`, for a checkpoint."""
    if not cfg.get("samples"):
        return sample(cfg, run_dir, task_name="evaluate")
    path = Path(cfg.samples)
    if not path.is_file():
        raise ConfigError(f"samples={path}: file not found (expected a samples.pt or samples.npz)")
    samples, labels = read_samples(path)
    datamodule = make(cfg, "data")
    datamodule.setup()
    run_dir.mkdir(parents=True, exist_ok=True)
    per_class = None if labels is None else int((labels == labels[0]).sum())
    metrics, extra = datamodule.domain.evaluate(datamodule, samples.float(), run_dir, cfg, eval_device(cfg),
                                                labels=labels, per_class=per_class, title=path.name)
    results = {"metrics": metrics, "protocol": {"task": "evaluate", "samples": str(path), "n_samples": len(samples),
                                                "labelled": labels is not None,
                                                **datamodule.domain.protocol(datamodule), **extra}}
    write_json(run_dir / "results.json", results)
    write_report(run_dir, f"{path.name}: evaluation report", sampling_facts(results["protocol"]), results,
                 {"Samples": "samples.png", "Samples per class": "samples_per_class.png"}, config={},
                 section="Evaluation")
    return results
