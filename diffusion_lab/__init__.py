"""diffusion_lab: Lightning + Hydra experiment suite for diffusion and flow-matching models."""

import hashlib
from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"


def _conf_dir() -> Path:
    """The config tree: diffusion_lab/conf inside an installed package (pyproject ships the top-level conf/
    there as package data), else the source checkout's conf/ (a clone, or `pip install -e .`, whose package
    is the checkout's own diffusion_lab/)."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return packaged if (packaged / "config.yaml").is_file() else here.parent / "conf"


CONF_DIR = _conf_dir()


def _path_free(item: str) -> str:
    """`data.path=../x/states.pt` -> `data.path=states.pt~1a2b3c`: a path value keeps its file name and a
    hash of the whole path, so a job's dir name changes with its data or checkpoint without nesting dirs."""
    key, sep, value = item.partition("=")
    if "/" not in value:
        return item
    return f"{key}{sep}{value.rstrip('/').rsplit('/', 1)[-1]}~{hashlib.sha1(value.encode()).hexdigest()[:6]}"


def job_dirname(num, overrides: str = "", limit: int = 120) -> str:
    """Sweep job directory name `<num>_<overrides>`, shortened with a stable hash past `limit` characters
    (file systems refuse names over 255 bytes; many overrides would exceed that). Path-valued overrides
    (data.path, ckpt, eval.judge, ...) are part of the name, as file name + hash of the path. The number is
    zero-padded to 3 digits so `ls` lists jobs in launch order (`010_` after `002_`) for every shipped sweep
    (the largest, solvers x seeds, has 360 jobs); the resolver never learns the sweep's size (it runs in each
    launcher worker), and the collector sorts by the number itself in any case."""
    overrides = ",".join(_path_free(item) for item in overrides.split(",")) if overrides else overrides
    head, sep, tail = str(num).partition("_")  # a sweep may prefix more: `${hydra.job.num}_${...experiment}`
    num = f"{int(head):03d}{sep}{tail}" if head.isdigit() else str(num)
    name = f"{num}_{overrides}" if overrides else num
    if len(name) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9]}-{digest}"


# Registered on import, so every process that composes a sweep job (joblib/submitit workers too) has it.
OmegaConf.register_new_resolver("dl_job_dirname", job_dirname, replace=True)


def _new_dir(base: str) -> str:
    from diffusion_lab.rundir import new_dir  # lazy: keep `import diffusion_lab` light

    return new_dir(base)


OmegaConf.register_new_resolver("dl_new_dir", _new_dir, replace=True)


def _latent_shape(source, index, pixel_size=None) -> int:
    from diffusion_lab.spaces import latent_shape  # lazy, as above

    return latent_shape(source, index, pixel_size)


# space=autoencoder: the latent channels and size come from the autoencoder checkpoint's stored config
OmegaConf.register_new_resolver("dl_latent_shape", _latent_shape, replace=True)


def load(ckpt, **kwargs):
    """A trained checkpoint as a Python object that samples, denoises and evaluates: see diffusion_lab.api.load."""
    from diffusion_lab.api import load as _load  # lazy: keep `import diffusion_lab` light

    return _load(ckpt, **kwargs)
