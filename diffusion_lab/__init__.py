"""diffusion_lab: Lightning + Hydra experiment suite for diffusion and flow-matching models."""

import hashlib

from omegaconf import OmegaConf

__version__ = "0.1.0"


def job_dirname(num, overrides: str = "", limit: int = 120) -> str:
    """Sweep job directory name `<num>_<overrides>`, shortened with a stable hash past `limit` characters
    (file systems refuse names over 255 bytes; many overrides would exceed that)."""
    name = f"{num}_{overrides}" if overrides else str(num)
    if len(name) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9]}-{digest}"


# Registered on import, so every process that composes a sweep job (joblib/submitit workers too) has it.
OmegaConf.register_new_resolver("dl_job_dirname", job_dirname, replace=True)
