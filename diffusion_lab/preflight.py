"""Checks a run makes before any work: the data can be read, the model fits them, the optimizer builds,
class requests and resume checkpoints match the model. Each failure is a one-line ConfigError."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.errors import ConfigError
from diffusion_lab.guidance import ClassifierGuidance, requested_labels
from diffusion_lab.latents import load_or_build
from diffusion_lab.optim import optimizer_config
from diffusion_lab.spaces import LatentSpace


def check_weights(stored: dict, expected: dict, source: str) -> None:
    """One line when a checkpoint holds another model's weights (other size, other net)."""
    missing = [k for k in expected if k not in stored]
    extra = [k for k in stored if k not in expected]
    shapes = [k for k in expected if k in stored and tuple(stored[k].shape) != tuple(expected[k].shape)]
    if missing or extra or shapes:
        what = (f"{shapes[0]} has shape {tuple(stored[shapes[0]].shape)}, this model's "
                f"{tuple(expected[shapes[0]].shape)}" if shapes else
                f"no weight {missing[0]}" if missing else f"an unknown weight {extra[0]}")
        differ = len(missing) + len(extra) + len(shapes)
        raise ConfigError(f"{source}: a checkpoint of a different model ({what}; {differ} tensors differ); "
                          "expected one of the configured model")


def _data_error(cfg: DictConfig, exc: BaseException) -> ConfigError:
    """A data module's load error as one line naming the data key it came from: the key whose value (a path)
    the message mentions, else data.path / data.root."""
    msg = next(iter(str(exc).strip().splitlines()), type(exc).__name__)
    if not isinstance(exc, (ValueError, OSError)):
        msg = f"{type(exc).__name__}: {msg}"
    if re.match(r"^[\w.]+=", msg):
        return ConfigError(msg if msg.startswith("data.") else f"data.{msg}")
    data = OmegaConf.select(cfg, "data") or {}
    named = [k for k, v in data.items() if isinstance(v, str) and v and v in msg]
    for key in [*named, "path", "root"]:
        value = data.get(key)
        if value:
            return ConfigError(f"data.{key}={value}: {msg}")
    return ConfigError(f"data: {msg}")


def setup_data(cfg: DictConfig, datamodule) -> None:
    """datamodule.setup() before any work (it is idempotent: Lightning's own call is then free), with read
    errors (missing root, malformed points file, unreadable batch) as one-line ConfigErrors."""
    try:
        datamodule.setup("fit")
    except ConfigError:
        raise
    except Exception as exc:  # any reader failure (missing, truncated, wrong format) is about the data's files
        raise _data_error(cfg, exc) from exc


def check_fit(cfg: DictConfig, parts) -> None:
    """A dry training loss on two zero inputs of the data's shape: a model that does not fit the data
    (channels, size, dimension, classes) fails here in one line instead of at step 0. The global RNG is
    forked, so the run's random stream (and every earlier number) is unchanged."""
    module, dm = parts.module, parts.datamodule
    x = torch.zeros(2, *module.space.shape)  # model space: pixels, points or latents
    cond = torch.zeros(2, dtype=torch.long) if getattr(module, "num_classes", 0) else None
    try:  # the optimizer and its LR schedule are built lazily by Lightning: build them once here
        optimizer_config(list(module.parameters()), module.optimizer_factory, module.lr_scheduler_factory)
    except (ValueError, TypeError) as exc:
        msg = next(iter(str(exc).strip().splitlines()), type(exc).__name__)
        raise ConfigError(f"optimizer: {msg}") from exc
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            per_sample, _ = module.objective.loss(module.net, x, cond)
        if per_sample.shape[0] != 2:
            raise ValueError(f"the loss has shape {tuple(per_sample.shape)}, expected one value per example")
    except Exception as exc:
        msg = next(iter(str(exc).strip().splitlines()), type(exc).__name__)[:200]
        model = str(OmegaConf.select(cfg, "model._target_", default="?"))
        raise ConfigError(f"model={model.rsplit('.', 1)[-1]}: does not fit data {getattr(dm, 'name', '')} in model "
                          f"space of shape {tuple(module.space.shape)} ({type(exc).__name__}: {msg})") from exc


def check_space(cfg: DictConfig, parts) -> None:
    """The space encodes items of the data's shape (an autoencoder trained at 32x32 cannot encode 28x28 MNIST),
    and a latent cache needs a latent space; one line, before any data are encoded."""
    space, dm = parts.module.space, parts.datamodule
    if tuple(space.data_shape) != tuple(dm.shape):
        raise ConfigError(f"space={OmegaConf.select(cfg, 'space._target_', default='?').rsplit('.', 1)[-1]}: "
                          f"encodes items of shape {tuple(space.data_shape)}, but data {dm.name} gives "
                          f"{tuple(dm.shape)}")
    if dm.cache_latents and not isinstance(space, LatentSpace):
        raise ConfigError("data.cache_latents=true: only a latent space has latents to cache "
                          "(space=autoencoder or space=diffusers_vae)")


def prepare_space(cfg: DictConfig, parts, resume: str | None) -> None:
    """Latent spaces: the latent cache (data.cache_latents) and the latent scaling, before the dry loss.

    A resumed run takes the scaling of its checkpoint (and refuses another autoencoder); a new run measures it
    on the training set: from the cache while it is built, else on space.stats_images training images."""
    space, dm = parts.module.space, parts.datamodule
    if not isinstance(space, LatentSpace):
        return
    if torch.cuda.is_available():  # encoding is the cost here: do it on the accelerator when there is one
        space.to("cuda")
    if dm.cache_latents:
        # Under DDP each rank runs this before the process group exists: a missing cache is built by every rank
        # (the same bytes, renamed atomically); after that every rank reads it.
        cache, protocol = load_or_build(dm, space, dm.latent_cache_dir, seed=int(cfg.seed))
        dm.attach_latents(cache)
        if space.scaling == "measured":
            info = protocol["latent_cache"]
            space.set_scaling(cache["shift"], cache["scale"],
                              f"latent cache {info['key']} ({info['n']} images x {info['flips']} flips, one "
                              "posterior draw each)")
        space.stats["latent_cache"] = protocol["latent_cache"]
    if resume:
        state = torch.load(resume, map_location="cpu", weights_only=True).get("space") or {}
        space.load_state(state, key=f"ckpt_path={resume}")
    elif space.needs_preparation():
        space.measure(dm.real_uint8("train", n=space.stats_images), seed=int(cfg.seed))
    space.to("cpu")


def check_classes(cfg: DictConfig, datamodule, module) -> None:
    """eval.classes against the data's classes and the model, before training (not after it)."""
    ev = cfg.eval
    if ev.get("classes") is None:
        return
    try:
        requested_labels(ev.classes, list(getattr(datamodule, "class_names", None) or []), 1)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    guided = isinstance(module.guidance, ClassifierGuidance)
    if not getattr(module, "num_classes", 0) and not guided:
        raise ConfigError(f"eval.classes={ev.classes}: the model is unconditional (model.num_classes=0); class "
                          "requests need a class-conditional model or guidance=classifier guidance.ckpt=<ckpt>")


def clean_orphans(run_dir: Path) -> None:
    """Temp files of writes a kill interrupted (atomic saves never leave a partial file under the real name)."""
    for folder in (run_dir, run_dir / "checkpoints"):
        for tmp in folder.glob(".tmp_*"):
            tmp.unlink(missing_ok=True)
