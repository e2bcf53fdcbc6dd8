"""Guidance as configuration (`guidance=cfg|classifier`): how a class request changes the denoiser.

A guidance object turns (net, objective, labels) into a denoiser for the samplers; neither the
samplers nor this module look at which objective trained the net (both guidance rules act on the
affine to_x0_eps conversion or on eps_hat/x0_hat, see samplers.guided_net / classifier_guided).
Labels use NULL_CLASS (-1) for "unconditional", so one batch can mix class requests and
unconditional rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffusion_lab.objectives import NULL_CLASS
from diffusion_lab.samplers import Denoiser, classifier_guided, guided_net, make_denoiser


class ClassifierFree:
    """Classifier-free guidance (Ho & Salimans 2022) at scale gamma: 1 conditional, 0 unconditional."""

    def __init__(self, scale: float = 5.0):
        if not scale >= 0:
            raise ValueError(f"scale={scale}: expected a guidance scale >= 0")
        self.scale = float(scale)

    def check(self, net, schedule, space=None) -> None:
        if not getattr(net, "num_classes", 0):
            raise ValueError("classifier-free guidance needs a class-conditional net (model.num_classes > 0, "
                             "trained with objective.p_uncond > 0)")

    def denoiser(self, net, objective, cond: Tensor | None) -> Denoiser:
        return make_denoiser(guided_net(net, self.scale) if cond is not None else net, objective, cond)

    def to(self, device) -> ClassifierFree:
        return self

    def describe(self) -> dict:
        return {"guidance": "classifier_free", "guidance_scale": self.scale}


class ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021) with a noise-conditional classifier checkpoint.

    eps_hat <- eps_hat - scale * sigma_t * grad log p(y | xt); rows with label -1 stay unguided. The
    classifier must have been trained on the same noise path as the diffusion model (checked).
    """

    def __init__(self, ckpt: str | None = None, scale: float = 1.0, chunk: int = 4096, use_ema: bool = True):
        if not ckpt:
            raise ValueError("ckpt=None: classifier guidance needs guidance.ckpt=<a classifier .ckpt written by "
                             "task=train_classifier>")
        if not scale >= 0 or chunk < 1:
            raise ValueError(f"scale={scale}, chunk={chunk}: expected scale >= 0 and chunk >= 1")
        from diffusion_lab.classifier import load_classifier  # classifier imports lit/build; avoid a cycle

        self.ckpt, self.scale, self.chunk = str(ckpt), float(scale), int(chunk)
        self.classifier, self.info = load_classifier(ckpt, use_ema=use_ema)
        if not self.info["noisy"]:
            raise ValueError(f"ckpt={ckpt}: this classifier was trained on clean data (task.noisy=false); "
                             "guidance needs a noise-conditional one (task.noisy=true)")

    def check(self, net, schedule, space=None) -> None:
        if space is not None and tuple(space.shape) != tuple(space.data_shape):  # train_classifier refuses latents
            raise ValueError(f"ckpt={self.ckpt}: classifier guidance works on pixels or points, but this model "
                             f"samples {type(space).__name__} latents; use guidance=cfg for latent diffusion")
        mine, theirs = self.info["schedule"], schedule.describe()
        if mine != theirs:
            raise ValueError(f"ckpt={self.ckpt}: classifier trained on schedule {mine}, but the diffusion model "
                             f"uses {theirs}; train the classifier with the model's schedule and timesteps")

    def denoiser(self, net, objective, cond: Tensor | None) -> Denoiser:
        denoise = make_denoiser(net, objective, cond)
        if cond is None:
            return denoise
        return classifier_guided(denoise, self.classifier, cond, self.scale, objective.schedule, self.chunk)

    def to(self, device) -> ClassifierGuidance:
        self.classifier.to(device)
        return self

    def describe(self) -> dict:
        return {"guidance": "classifier", "guidance_scale": self.scale, "classifier": self.ckpt,
                "classifier_step": self.info["step"]}


def describe(guidance) -> dict:
    return guidance.describe() if guidance is not None else {"guidance": None}


def requested_labels(classes, class_names: Sequence[str], n_per_class: int, unconditional: bool = False,
                     key: str = "eval.classes") -> tuple[Tensor | None, list[str]]:
    """Class requests -> (labels (N,) with -1 for unconditional rows, or None; the group names).

    classes: null (unconditional), "all" (every class), or a list of class indices / names; each
    requested class gets n_per_class samples, plus n_per_class unconditional ones if `unconditional`.
    """
    if classes is None:
        return None, []
    names = list(class_names)
    if not names:
        raise ValueError(f"{key}={classes}: the data are unconditional (data.num_classes=0)")
    if classes == "all":
        idx = list(range(len(names)))
    elif isinstance(classes, str) or not isinstance(classes, Sequence):
        raise ValueError(f"{key}={classes}: expected null, 'all' or a list of class indices/names")
    else:
        idx = []
        for c in classes:
            if isinstance(c, str) and c in names:
                idx.append(names.index(c))
            elif isinstance(c, int) and 0 <= c < len(names):
                idx.append(c)
            else:
                raise ValueError(f"{key}={list(classes)}: unknown class {c!r}; classes are 0..{len(names) - 1} "
                                 f"or names {names}")
    groups = [names[i] for i in idx] + (["unconditional"] if unconditional else [])
    labels = torch.tensor(idx + ([NULL_CLASS] if unconditional else []), dtype=torch.long)
    return labels.repeat_interleave(n_per_class), groups
